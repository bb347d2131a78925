"""Every run's training curves on disk: ``<run dir>/history.csv``, one row per epoch, and
``<run dir>/test.json`` with the test metrics.

W&B keeps the curves in its own run files; these two plain files are what ``skipnets compare
curves`` and ``skipnets study`` read, with or without W&B. Every ``skipnets`` command adds
:class:`History` to its callbacks; a Python ``Trainer`` can add it like any callback.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from skipnets.runs import run_dir

__all__ = [
    "HISTORY_FILE",
    "TEST_FILE",
    "History",
    "draw_metric",
    "metric_label",
    "read_history",
    "read_test",
]

HISTORY_FILE = "history.csv"
TEST_FILE = "test.json"
#: The columns every row has; the logged metrics follow, in name order.
FIRST = ("epoch", "step", "seconds", "train_loss")
#: What the figures call the usual columns.
LABELS = {
    "train_loss": "training loss",
    "train/acc": "training accuracy",
    "val/acc": "validation accuracy",
    "val/loss": "validation loss",
}


class History(Callback):
    """One row per training epoch in ``<run dir>/history.csv``; the test metrics in
    ``test.json``.

    A row holds the epoch, the optimizer steps done by its end, the training time so far in
    seconds (``seconds``: time in training epochs and their validation, summed over a resumed
    run's sessions), ``train_loss`` (the mean of the training step's loss over the epoch's
    batches, averaged over ranks) and every scalar the model logged for that epoch
    (``val/acc``, ``val/loss``, ``train/acc``, ...).

    The loss is summed on the device as it comes (no host sync in the step) and read once per
    epoch. The rows are kept in checkpoints, so a resumed run's file continues its own history;
    an evaluation of a checkpoint (``skipnets test``, the test after ``fit``) does not bring an
    older history back. Rank zero writes.

    .. code-block:: python

        trainer = L.Trainer(callbacks=[History()])
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._fitting = False
        self._loss: torch.Tensor | None = None
        self._batches = 0
        self._seconds = 0.0  # training time before this session (from the checkpoint)
        self._started: float | None = None
        self._pending: dict[str, Any] | None = None  # a row whose train/* metrics are not in yet

    @classmethod
    def compare_runs(
        cls, runs: dict[str, Path], out: Path, metrics: Sequence[str] = ("train_loss", "val/acc")
    ) -> list[Path]:
        """``skipnets compare curves RUN_DIR...``: the runs' training curves on shared axes, one
        panel per metric; ``curves.png`` and ``curves.csv`` (run, then history.csv's columns)."""
        from skipnets.errors import ConfigError

        histories = {label: read_history(directory) for label, directory in runs.items()}
        missing = [f"{label} ({runs[label]})" for label, rows in histories.items() if not rows]
        if missing:
            raise ConfigError(
                f"no {HISTORY_FILE} in: {', '.join(missing)} (runs trained by skipnets write it)"
            )
        fig = _figure(1, len(metrics), (4.6, 3.6))
        for ax, metric in zip(fig.axes, metrics):
            draw_metric(ax, histories, metric)
            ax.set_xlabel("epoch")
            ax.set_ylabel(metric_label(metric))
        fig.axes[0].legend(fontsize="small")
        png = out / "curves.png"
        fig.savefig(png, dpi=120)
        columns = sorted({k for rows in histories.values() for r in rows for k in r})
        columns = ["epoch", *(c for c in columns if c != "epoch")]
        path = out / "curves.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["run", *columns])
            for label, rows in histories.items():
                for r in rows:
                    writer.writerow([label, *(_cell(c, r.get(c)) for c in columns)])
        return [png, path]

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._complete_pending()
        return {"rows": [dict(r) for r in self.rows], "seconds": self._elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._fitting:
            return  # evaluating a checkpoint: this run's history stays as it is
        self.rows = [dict(r) for r in state_dict.get("rows", [])]
        self._seconds = float(state_dict.get("seconds", 0.0))

    # -- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._fitting = stage == "fit"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._complete_pending(trainer)
        self._loss, self._batches = None, 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch, batch_idx
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        # Lightning hands on the loss divided by the gradient accumulation count. One operation
        # on the device a step where it can be (each is host time on a GPU that waits for it).
        loss = loss.detach().float()
        if trainer.accumulate_grad_batches != 1:
            loss = loss * trainer.accumulate_grad_batches
        self._loss = loss.clone() if self._loss is None else self._loss.add_(loss)
        self._batches += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Called before the module's own epoch-end logging (train/acc): those metrics are added
        # when the next epoch starts, when a checkpoint is written or when training ends.
        mean = math.nan
        if self._loss is not None and self._batches:
            total = trainer.strategy.reduce(self._loss / self._batches, reduce_op="mean")
            mean = float(total)
        row = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "seconds": round(self._elapsed(), 3),
            "train_loss": mean,
            **_scalars(trainer, skip_prefix="train/"),
        }
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        self._pending = row
        self._write(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._complete_pending(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = _scalars(trainer, only_prefix="test/")
        if not metrics or not trainer.is_global_zero:
            return
        record = {"checkpoint": Path(trainer.ckpt_path).name if trainer.ckpt_path else None}
        record.update(metrics)
        path = run_dir(trainer) / TEST_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")

    # -- helpers -------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self._seconds + running

    def _complete_pending(self, trainer: L.Trainer | None = None) -> None:
        row, self._pending = self._pending, None
        trainer = trainer or getattr(self, "_trainer", None)
        if row is None or trainer is None:
            return
        for key, value in _scalars(trainer, only_prefix="train/").items():
            if key != "train/loss":  # the last logging window's mean; train_loss is the epoch's
                row.setdefault(key, value)
        self._write(trainer)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer  # for state_dict, which Lightning calls without it

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = None

    @rank_zero_only
    def _write(self, trainer: L.Trainer) -> None:
        if not self.rows:
            return
        extra = sorted({k for r in self.rows for k in r} - set(FIRST))
        path = run_dir(trainer) / HISTORY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".csv.partial")
        with open(partial, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*FIRST, *extra], restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        partial.replace(path)


def _scalars(
    trainer: L.Trainer, *, only_prefix: str | None = None, skip_prefix: str | None = None
) -> dict[str, float]:
    values = {}
    for key, value in trainer.callback_metrics.items():
        if only_prefix and not key.startswith(only_prefix):
            continue
        if skip_prefix and key.startswith(skip_prefix):
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)):
            values[key] = float(value)
    return dict(sorted(values.items()))


def metric_label(metric: str) -> str:
    return LABELS.get(metric, metric)


def draw_metric(
    ax: Any, histories: dict[str, list[dict[str, float]]], metric: str, colours: Any = None
) -> None:
    """One line per run of ``metric`` against epoch (counted from 1); a run that stopped on a
    non-finite value ends in a cross. Losses on a log scale, accuracies from 0 to 1."""
    from matplotlib.ticker import MaxNLocator

    for label, rows in histories.items():
        colour = colours(label) if colours else None
        points = [(r["epoch"] + 1, r[metric]) for r in rows if metric in r]
        if not points:
            ax.plot([], [], color=colour, label=f"{label}: no {metric}")
            continue
        x, y = zip(*points)
        finite = [(a, b) for a, b in points if math.isfinite(b)]
        (line,) = ax.plot(x, y, color=colour, marker="." if len(x) <= 30 else None, label=label)
        if len(finite) < len(points) and finite:
            ax.plot(*finite[-1], "x", color=line.get_color(), markersize=8)
    if metric.endswith("loss"):
        ax.set_yscale("log")
    elif metric.endswith("acc"):
        ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _figure(rows: int, columns: int, size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * columns, size[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.subplots(rows, columns, squeeze=False)
    return fig


def _cell(column: str, value: Any) -> Any:
    if value is None:
        return ""
    return int(value) if column in ("epoch", "step") else value


def read_history(directory: Path) -> list[dict[str, float]]:
    """A run's ``history.csv`` as rows of numbers (empty cells left out); ``[]`` when the run has
    none."""
    path = Path(directory) / HISTORY_FILE
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            row = {}
            for key, value in raw.items():
                if value not in ("", None):
                    try:
                        row[key] = float(value)
                    except ValueError:
                        continue
            rows.append(row)
    return rows


def read_test(directory: Path) -> dict[str, Any]:
    """A run's ``test.json`` (``{}`` when it has none)."""
    path = Path(directory) / TEST_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
