"""NormRatio's overhead at its default interval: training step time of a ResNet-56 with the
callback against the same run without it, measured in the same process, runs alternated.

    python -m benchmarks.bench_norm_ratio                 # CPU: batch 16, 150 steps per run
    python -m benchmarks.bench_norm_ratio --device cuda --batch-size 128

Prints one table row and returns the numbers from ``main()``. The step time is the wall time
between consecutive training batches (forward, backward, optimizer, callbacks, data), after a
warm-up; the ratio is with / without. NormRatio runs with its defaults (every 50 steps) and,
to measure the cost of an observed step, on every step.
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
    """Wall time between the starts of consecutive training batches."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.starts.append(time.perf_counter())

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])][WARMUP_STEPS:]


def run(every_n_steps: int | None, steps: int, batch_size: int, device: str) -> list[float]:
    """Step times of one training run; ``every_n_steps`` None: without NormRatio."""
    torch.manual_seed(0)
    images = torch.randn(batch_size * 8, 3, 32, 32)
    labels = torch.randint(0, 10, (batch_size * 8,))
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
) -> dict[str, Any]:
    """Alternate runs without NormRatio, with it at its default interval, and with it on every
    step (order reversed each round); print one row.

    At the default interval only one step in 50 is observed, so on a busy machine the direct
    ratio is noisy; the every-step ratio measures the cost of an observed step, and
    ``1 + (every_step_ratio - 1) / interval`` is the overhead it implies at the default interval.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = batch_size or (128 if device == "cuda" else 16)
    steps = steps or (55 if quick else 150)
    repeats = repeats or (1 if quick else 2)
    interval = NormRatio().every_n_steps
    variants: dict[str, int | None] = {"baseline": None, "default": interval, "every_step": 1}

    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(repeats):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in order:
            times[name] += run(variants[name], steps, batch_size, device)
    mean = {name: statistics.fmean(values) for name, values in times.items()}
    every_step_ratio = mean["every_step"] / mean["baseline"]
    result = {
        "benchmark": "norm_ratio",
        "model": "resnet56",
        "device": device,
        "batch_size": batch_size,
        "interval": interval,
        "steps": len(times["baseline"]),
        "baseline_ms": 1e3 * mean["baseline"],
        "norm_ratio_ms": 1e3 * mean["default"],
        "every_step_ms": 1e3 * mean["every_step"],
        "ratio": mean["default"] / mean["baseline"],
        "every_step_ratio": every_step_ratio,
        "implied_ratio": 1 + (every_step_ratio - 1) / interval,
    }
    print(
        f"norm_ratio  resnet56  {device}  batch {batch_size}  baseline "
        f"{result['baseline_ms']:.1f} ms/step  every {interval} steps "
        f"{result['norm_ratio_ms']:.1f} ms/step (ratio {result['ratio']:.3f})  every step "
        f"{result['every_step_ms']:.1f} ms/step (ratio {every_step_ratio:.3f}, implying "
        f"{result['implied_ratio']:.4f} at every {interval})"
    )
    return result


def _cli(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="55 steps, one round of runs")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of runs")
    args = parser.parse_args(argv)
    return main(args.quick, args.device, args.batch_size, args.steps, args.repeats)


if __name__ == "__main__":
    _cli()
