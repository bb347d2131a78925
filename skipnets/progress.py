"""``TimedProgressBar``: Lightning's TQDM bar, redrawn on a clock instead of every batch, as
wide as the terminal, and one line per redraw in a log file."""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import time
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import get_standard_metrics
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

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

    In a terminal, the metrics after the bar are the ones that fit its width, most useful first
    (the training loss, then validation accuracy and loss, then the rest in logging order): the
    bar keeps at least :data:`MIN_BAR` columns and no name is cut. Written to a file (a job's log,
    ``> run.log``), each redraw is one line, with no carriage returns or cursor moves.

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

    def init_sanity_tqdm(self) -> Tqdm:
        with _bar_stream():
            return super().init_sanity_tqdm()

    def init_train_tqdm(self) -> Tqdm:
        with _bar_stream():
            return super().init_train_tqdm()

    def init_validation_tqdm(self) -> Tqdm:
        with _bar_stream():
            return super().init_validation_tqdm()

    def init_test_tqdm(self) -> Tqdm:
        with _bar_stream():
            return super().init_test_tqdm()

    def init_predict_tqdm(self) -> Tqdm:
        with _bar_stream():
            return super().init_predict_tqdm()

    def _postfix(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = self.get_metrics(trainer, pl_module)
        bar = self.train_progress_bar
        if not isinstance(bar.fp, _LinePerRedraw) and _is_terminal(bar.fp):
            metrics = fit_width(metrics, shutil.get_terminal_size().columns, _fixed_width(bar))
        return metrics

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
        bar = self.train_progress_bar
        if bar is None or bar.disable or not self._due(batch_idx, self.total_train_batches):
            return
        # One redraw with the new count and metrics (Lightning's bar redraws for each).
        bar.n = batch_idx + 1
        bar.set_postfix(self._postfix(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            bar.set_postfix(self._postfix(trainer, pl_module))
        if self._leave:
            bar.close()

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


#: Columns the bar itself keeps when metrics are dropped to fit a terminal.
MIN_BAR = 10
#: The width tqdm gives a bar when it is not told the line's width.
_DEFAULT_BAR = 10
#: The metrics shown first when not all fit, in this order.
FIRST = ("train/loss", "val/acc", "val/loss")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def fit_width(metrics: dict[str, Any], columns: int, fixed: int) -> dict[str, Any]:
    """The metrics (most useful first: :data:`FIRST`, then the others in order) that fit in
    ``columns`` beside ``fixed`` columns of description, counter and times and a bar of
    :data:`MIN_BAR`; each shown as tqdm shows it, ``, name=value``."""
    ordered = [k for k in FIRST if k in metrics] + [k for k in metrics if k not in FIRST]
    room = columns - fixed - MIN_BAR
    kept: dict[str, Any] = {}
    for key in ordered:
        value = metrics[key]
        shown = Tqdm.format_num(value) if isinstance(value, (int, float, str)) else str(value)
        width = len(key) + 1 + len(shown) + 2
        if width > room:
            continue
        room -= width
        kept[key] = value
    return kept


def _fixed_width(bar: Tqdm) -> int:
    """The columns of ``bar``'s line without its bar and metrics (description, percentage,
    counter, elapsed and remaining time, rate), drawn as tqdm draws it now, with room for the
    rate to grow by four digits."""
    state = {**bar.format_dict, "postfix": None, "ncols": None}
    return len(bar.format_meter(**state)) - _DEFAULT_BAR + 4


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _LinePerRedraw:
    """A stream for tqdm that is not a terminal: every redraw (tqdm writes ``\\r`` and the
    line, cursor moves for stacked bars) becomes one plain line; blanking writes and repeats
    of the same line are left out."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._last = ""

    def write(self, text: str) -> int:
        for part in re.split(r"[\r\n]", _ANSI.sub("", text)):
            line = part.rstrip()
            if line and line != self._last:
                self.stream.write(line + "\n")
                self._last = line
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(AttributeError, ValueError):
            self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def _bar_stream():
    """While a bar is made: ``sys.stdout`` (where Lightning's bars write) as a stream of one
    line per redraw when it is not a terminal."""
    stream = sys.stdout
    if _is_terminal(stream) or isinstance(stream, _LinePerRedraw):
        yield
        return
    with contextlib.redirect_stdout(_LinePerRedraw(stream)):
        yield
