"""``skipnets fit`` training steps/s against a minimal hand-written PyTorch loop.

The skipnets side is the real path: the ``skipnets fit`` CLI builds the Classifier, the Digits
data module and the Trainer with its defaults (checkpointing, the progress bar, loss logging,
training metrics, validation every epoch, the non-finite loss check), with a CSV logger in place
of W&B. The baseline trains the same model on the same in-memory tensors with the same
optimiser, indexing a shuffled permutation. Both run in one process, so the baseline also gets
the allocator setting ``skipnets fit`` makes (``skipnets.allocator``), which speeds it up too.

The note gives a third figure for reference: a bare Lightning ``Trainer`` (no logger, checkpoints,
progress bar or metrics) around a minimal LightningModule, over the same hand-written loop. It is
the part of the cost that is Lightning's own per-step machinery (its hooks, closure and fetcher).

Steady-state steps only: the time between consecutive ends of training steps within an epoch,
after a few warm-up steps. That covers fetching the batch, forward, backward, the optimiser and
every per-step hook; epoch boundaries (validation, checkpoint, the new data iterator) are paid
once per epoch and left out on both sides.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from benchmarks.common import Row, interleaved

CASES = {
    "resnet20": {
        "arch": "resnet20",
        "arch_kwargs": {},
        "data": {"image_size": 16, "batch_size": 64},
        "lr": 0.1,
        "target": 0.97,
    },
    "mlp20": {
        "arch": "plain_mlp",
        "arch_kwargs": {"depth": 20, "width": 256},
        "data": {"image_size": None, "batch_size": 128},
        "lr": 0.01,
        "target": 0.90,
    },
}

OPTIMIZER = {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}


class StepTimes(L.Callback):
    """Durations between consecutive training-step ends of the same epoch, after ``warmup``."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.steps = 0
        self.last: float | None = None
        self.durations: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.steps += 1
        if self.last is not None and self.steps > self.warmup:
            self.durations.append(now - self.last)
        self.last = now


def _cli(case: dict[str, Any], steps: int, root: str):
    from skipnets.lightning_cli import SkipnetsCLI

    data = case["data"]
    args = [
        f"--model.arch={case['arch']}",
        f"--model.arch_kwargs={case['arch_kwargs']}",
        "--data=Digits",
        f"--data.image_size={'null' if data['image_size'] is None else data['image_size']}",
        f"--data.batch_size={data['batch_size']}",
        "--optimizer=torch.optim.SGD",
        f"--optimizer.lr={case['lr']}",
        *(f"--optimizer.{k}={v}" for k, v in OPTIMIZER.items()),
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={root}",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={steps}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
    ]
    return SkipnetsCLI(args=args, run=False)


def skipnets_rate(case: dict[str, Any], steps: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as root:
        cli = _cli(case, steps + warmup, root)
        timer = StepTimes(warmup)
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return len(timer.durations) / sum(timer.durations)


class _BareModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.lr, **OPTIMIZER)


def bare_lightning_rate(case: dict[str, Any], steps: int, warmup: int) -> float:
    from skipnets.data import Digits
    from skipnets.registry import create_model

    data = Digits(**case["data"])
    in_kwargs = {"in_features": 64} if case["data"]["image_size"] is None else {"in_channels": 1}
    model = create_model(case["arch"], num_classes=10, **in_kwargs, **case["arch_kwargs"])
    timer = StepTimes(warmup)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            max_steps=steps + warmup,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[timer],
            default_root_dir=root,
        )
        trainer.fit(_BareModule(model, case["lr"]), datamodule=data)
    return len(timer.durations) / sum(timer.durations)


def handwritten_rate(case: dict[str, Any], steps: int, warmup: int) -> float:
    from skipnets.data import Digits
    from skipnets.registry import create_model

    data = Digits(**case["data"])
    data.setup("fit")
    x, y = data.train_set.tensors
    in_kwargs = {"in_features": 64} if x.ndim == 2 else {"in_channels": 1}
    model = create_model(case["arch"], num_classes=10, **in_kwargs, **case["arch_kwargs"])
    optimizer = torch.optim.SGD(model.parameters(), lr=case["lr"], **OPTIMIZER)
    model.train()
    batch_size, n = data.batch_size, len(y)
    durations: list[float] = []
    done = 0
    while done < steps + warmup:
        order = torch.randperm(n)
        last = None
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            now = time.perf_counter()
            done += 1
            if last is not None and done > warmup:
                durations.append(now - last)
            last = now
            if done == steps + warmup:
                break
    return len(durations) / sum(durations)


def main(quick: bool = False) -> list[Row]:
    from skipnets.allocator import keep_freed_memory

    keep_freed_memory()  # what `skipnets fit` does first; before any run, so all three share it
    rows = []
    steps, repeats = (6, 1) if quick else (60, 7)
    for name, case in CASES.items():
        best = interleaved(
            {
                "skipnets fit": lambda case=case: skipnets_rate(case, steps, warmup=3),
                "hand-written loop": lambda case=case: handwritten_rate(case, steps, warmup=3),
                "bare Lightning": lambda case=case: bare_lightning_rate(case, steps, warmup=3),
            },
            repeats,
        )
        data = case["data"]
        shape = f"{data['image_size']}px" if data["image_size"] else "vectors"
        rows.append(
            Row(
                f"skipnets fit {name} (Digits {shape}, batch {data['batch_size']})",
                "steps/s",
                best["skipnets fit"],
                "hand-written loop",
                best["hand-written loop"],
                target=f">= {case['target']}",
                note="bare Lightning Trainer: "
                f"{best['bare Lightning'] / best['hand-written loop']:.3f}",
            )
        )
    return rows
