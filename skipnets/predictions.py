"""``skipnets predict`` writes what it predicted: one CSV row per sample.

The file is ``<run dir>/predictions/<checkpoint name>.csv`` in the run that trained the
checkpoint (as ``skipnets analyse`` does), or ``<run dir>/predictions/predictions.csv`` without a
checkpoint. Columns: ``index`` (the sample's position in the split), ``predicted`` (the class
with the highest probability), ``label`` (when the data has labels), then ``p_0 .. p_{C-1}``.
Under DDP every rank's rows are gathered and rank zero writes them in index order.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from skipnets.runs import run_dir, trained_run_dir

__all__ = ["PredictionCSV"]


class PredictionCSV(BasePredictionWriter):
    """Collects each predict batch's probabilities (and labels) and writes them as one CSV."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.rows: list[tuple[int, int, int | None, list[float]]] = []
        self.path: Path | None = None
        self._next = 0  # this rank's count, for loaders that do not report indices

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows, self._next = [], 0
        loader = trainer.predict_dataloaders
        indices = getattr(loader, "indices", None)  # a DeviceLoader says which samples it serves
        self._served = indices().tolist() if callable(indices) else None

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, Tensor) or prediction.ndim != 2:
            return  # not class probabilities (a segmentation's maps): nothing to tabulate
        probabilities = prediction.detach().float().cpu()
        count = probabilities.shape[0]
        if batch_indices is not None and len(batch_indices) == count:
            positions = [int(i) for i in batch_indices]
        elif self._served is not None:
            positions = self._served[self._next : self._next + count]
        else:
            positions = list(range(self._next, self._next + count))
        self._next += count
        labels: list[int | None] = [None] * count
        if isinstance(batch, (list, tuple)) and len(batch) > 1 and isinstance(batch[1], Tensor):
            target = batch[1].detach().cpu()
            if target.ndim == 1 and len(target) == count:
                labels = [int(t) for t in target]
        predicted = probabilities.argmax(dim=1).tolist()
        for position, guess, label, row in zip(
            positions, predicted, labels, probabilities.tolist()
        ):
            self.rows.append((position, guess, label, row))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = self.rows
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if not trainer.is_global_zero or not rows:
            return
        rows.sort(key=lambda row: row[0])
        self.path = self._path(trainer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        classes = len(rows[0][3])
        has_labels = any(label is not None for _, _, label, _ in rows)
        with open(self.path, "w", newline="") as handle:
            writer = csv.writer(handle)
            header = ["index", "predicted", *(["label"] if has_labels else [])]
            writer.writerow(header + [f"p_{c}" for c in range(classes)])
            for position, guess, label, probabilities in rows:
                fields = [position, guess, *([label] if has_labels else [])]
                writer.writerow(fields + [f"{p:.6g}" for p in probabilities])
        print(f"Predictions for {len(rows)} samples: {self.path}")

    @staticmethod
    def _path(trainer: L.Trainer) -> Path:
        checkpoint = trainer.ckpt_path
        if checkpoint and Path(checkpoint).is_file():
            return trained_run_dir(checkpoint) / "predictions" / f"{Path(checkpoint).stem}.csv"
        return run_dir(trainer) / "predictions" / "predictions.csv"
