"""``TimedProgressBar``: Lightning's TQDM bar, redrawn on a clock instead of every batch."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import get_standard_metrics

from skipnets.errors import ConfigError


class TimedProgressBar(TQDMProgressBar):
    """The progress bar of every ``skipnets`` run: Lightning's ``TQDMProgressBar``, redrawn when
    ``refresh_interval`` seconds have passed since the last redraw, and at the last batch.

    Lightning's bar redraws every ``refresh_rate`` batches, and a redraw (the counter, the
    metrics, the terminal write) costs a fraction of a millisecond: on a small network, a few
    percent of every step. A bar on a clock shows the same thing and costs one redraw per
    interval, whatever the speed of the steps.

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: skipnets.progress.TimedProgressBar
              init_args: {refresh_interval: 1.0}

    A config that names a progress bar of its own (``TQDMProgressBar``, ``RichProgressBar``)
    gets that one instead; ``trainer.enable_progress_bar: false`` turns the bar off.

    Args:
        refresh_interval: seconds between redraws (default 0.5; 0 redraws at every batch).
        leave: keep each epoch's bar on screen (as ``TQDMProgressBar``).
    """

    def __init__(self, refresh_interval: float = 0.5, leave: bool = False) -> None:
        if refresh_interval < 0:
            raise ConfigError(f"refresh_interval must be >= 0 seconds, got {refresh_interval}")
        super().__init__(refresh_rate=1, leave=leave)
        self.refresh_interval = refresh_interval
        self._last_redraw = float("-inf")

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        # The Classifier logs train/loss without prog_bar (Lightning would read a prog_bar value
        # on the host after every step); it is read here, once per redraw.
        metrics = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is None or "train/loss" in metrics:
            return metrics
        standard = {k: metrics[k] for k in get_standard_metrics(trainer) if k in metrics}
        return {**standard, "train/loss": float(loss), **metrics}

    def _due(self, batch_idx: int, total: float | int | None) -> bool:
        now = time.monotonic()
        if now - self._last_redraw >= self.refresh_interval or batch_idx + 1 == total:
            self._last_redraw = now
            return True
        return False

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._due(batch_idx, self.total_train_batches):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._due(batch_idx, self.total_val_batches_current_dataloader):
            super().on_validation_batch_end(
                trainer, pl_module, outputs, batch, batch_idx, dataloader_idx
            )

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._due(batch_idx, self.total_test_batches_current_dataloader):
            super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._due(batch_idx, self.total_predict_batches_current_dataloader):
            super().on_predict_batch_end(
                trainer, pl_module, outputs, batch, batch_idx, dataloader_idx
            )
