"""NormRatio's overhead at its default interval: training step time of a ResNet-56 with the
callback against the same run without it, measured in the same process, runs alternated.

    python -m benchmarks.bench_norm_ratio                 # CPU: batch 16, 150 steps per run
    python -m benchmarks.bench_norm_ratio --device cuda --batch-size 128

Prints one table row and returns the numbers from ``main()``. The step time is the wall time
between consecutive training batches (forward, backward, optimizer, callbacks, data), after a
warm-up, within one epoch (the per-epoch CSV and figure are paid once per epoch, not per step);
the ratio is with / without (see ``main`` for the paired measurement, which holds up on
a busy machine).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from skipnets_plugins.norm_ratio import NormRatio
from torch.utils.data import DataLoader, TensorDataset

from skipnets.module import Classifier

WARMUP_STEPS = 5


class StepTimes(Callback):
    """Wall time between the starts of consecutive training batches, by global step."""

    def __init__(self) -> None:
        self.starts: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.starts.append((trainer.global_step, time.perf_counter()))

    def step_times(self) -> list[tuple[int, float]]:
        pairs = zip(self.starts, self.starts[1:])
        return [(step, end - start) for (step, start), (_, end) in pairs][WARMUP_STEPS:]


def run(
    every_n_steps: int | None, steps: int, batch_size: int, device: str
) -> list[tuple[int, float]]:
    """``(step, seconds)`` of one training run; ``every_n_steps`` None: without NormRatio."""
    torch.manual_seed(0)
    # One epoch longer than the run: NormRatio writes its CSV and figure at each epoch end,
    # which an 8-batch epoch would turn into most of its cost (CIFAR has 391 steps per epoch).
    images = torch.randn(batch_size * (steps + 2), 3, 32, 32)
    labels = torch.randint(0, 10, (batch_size * (steps + 2),))
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True)
    module = Classifier("resnet56", num_classes=10, input_shape=(3, 32, 32))
    timer = StepTimes()
    callbacks: list[Callback] = [timer]
    if every_n_steps is not None:
        callbacks.insert(0, NormRatio(every_n_steps=every_n_steps))
    L.Trainer(
        max_steps=steps + 1,
        accelerator=device,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir="/tmp/bench_norm_ratio",
        callbacks=callbacks,
    ).fit(module, train_dataloaders=loader)
    return timer.step_times()


def main(
    quick: bool = False,
    device: str | None = None,
    batch_size: int | None = None,
    steps: int | None = None,
    repeats: int | None = None,
    paired_only: bool = False,
) -> dict[str, Any]:
    """Print one row: NormRatio's overhead at its default interval on a ResNet-56.

    Two measurements. Direct: runs without NormRatio and with it at its default interval,
    alternated (order reversed each round). Paired: one run observing every other step; the
    observed steps against their unobserved neighbours give the cost of an observed step under
    the same machine load, and ``1 + (paired_ratio - 1) / interval`` the overhead it implies at
    the default interval. On a busy machine the direct ratio is noisy (one step in 50 differs),
    the paired one much less.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = batch_size or (128 if device == "cuda" else 16)
    steps = steps or (55 if quick else 150)
    repeats = repeats or (1 if quick else 2)
    interval = NormRatio().every_n_steps

    paired = run(2, steps, batch_size, device)
    observed = statistics.fmean(t for step, t in paired if step % 2 == 0)
    unobserved = statistics.fmean(t for step, t in paired if step % 2 == 1)
    paired_ratio = observed / unobserved
    result: dict[str, Any] = {
        "benchmark": "norm_ratio",
        "model": "resnet56",
        "device": device,
        "batch_size": batch_size,
        "interval": interval,
        "observed_step_ms": 1e3 * observed,
        "unobserved_step_ms": 1e3 * unobserved,
        "paired_ratio": paired_ratio,
        "implied_ratio": 1 + (paired_ratio - 1) / interval,
    }
    row = (
        f"norm_ratio  resnet56  {device}  batch {batch_size}  observed step "
        f"{result['observed_step_ms']:.1f} ms vs {result['unobserved_step_ms']:.1f} ms "
        f"(ratio {paired_ratio:.3f}, implying {result['implied_ratio']:.4f} at every {interval})"
    )
    if not paired_only:
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(repeats):
            for tracked in (False, True) if i % 2 == 0 else (True, False):
                every = interval if tracked else None
                times[tracked] += [t for _, t in run(every, steps, batch_size, device)]
        baseline, with_callback = statistics.fmean(times[False]), statistics.fmean(times[True])
        result |= {
            "baseline_ms": 1e3 * baseline,
            "norm_ratio_ms": 1e3 * with_callback,
            "ratio": with_callback / baseline,
        }
        row += (
            f"  direct: baseline {result['baseline_ms']:.1f} ms/step, with NormRatio "
            f"{result['norm_ratio_ms']:.1f} ms/step (ratio {result['ratio']:.3f})"
        )
    print(row)
    return result


def _cli(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="55 steps, one round of runs")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of direct runs")
    parser.add_argument(
        "--paired-only", action="store_true", help="skip the direct with/without comparison"
    )
    args = parser.parse_args(argv)
    return main(
        args.quick, args.device, args.batch_size, args.steps, args.repeats, args.paired_only
    )


if __name__ == "__main__":
    _cli()
