"""The schedules shared by the plugins that measure a network as it is at a few moments: when
training ends and on a checkpoint (``skipnets analyse``), and for some also when ``fit`` starts
and every few epochs."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from skipnets_plugins._plotting import log_rows

#: The columns every milestone measurement's row starts with (:func:`milestone_fields`).
MILESTONE_COLUMNS = ("when", "epoch", "step", "arch", "depth")


def model_depth(pl_module: L.LightningModule) -> int:
    """The depth the registry's builder was given, else the number of layers with weights."""
    hparams = getattr(pl_module, "hparams", {}) or {}
    depth = (hparams.get("arch_kwargs") or {}).get("depth")
    if isinstance(depth, int):
        return depth
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return sum(isinstance(m, layers) for m in pl_module.modules())


def arch_name(pl_module: L.LightningModule) -> str:
    return (getattr(pl_module, "hparams", {}) or {}).get("arch") or type(pl_module).__name__


def milestone_fields(trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> dict:
    """The first fields of a measurement's row: when, where in training, which network."""
    return {
        "when": when,
        "epoch": trainer.current_epoch,
        "step": trainer.global_step,
        "arch": arch_name(pl_module),
        "depth": model_depth(pl_module),
    }


def on_a_checkpoint(trainer: L.Trainer) -> bool:
    """Whether a validation is a standalone one (``skipnets analyse`` or a plugin's command on a
    checkpoint), not ``fit``'s own validation or its sanity check."""
    return trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking


class RunWhenTrained(Callback):
    """Calls :meth:`run` when training ends and in a standalone validation on a checkpoint."""

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        raise NotImplementedError

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if on_a_checkpoint(trainer):
            self.run(trainer, pl_module)


class MeasuredAtMilestones(Callback):
    """Calls :meth:`measure` with ``when``: ``init`` as ``fit`` starts (not when it resumes: the
    weights are not the initial ones then), ``epoch<E>`` after every ``every_n_epochs`` training
    epochs (0: never), ``trained`` when training ends, and ``checkpoint`` in a standalone
    validation (``skipnets analyse``), which starts the rows afresh. The rows (one per
    measurement, :attr:`columns`) are kept in checkpoints and logged to W&B as the table
    :attr:`table` from rank zero when training ends and after a checkpoint's measurement."""

    #: The W&B table the rows are logged to, and their columns.
    table: str
    columns: tuple[str, ...]

    def __init__(self, every_n_epochs: int = 0) -> None:
        super().__init__()
        self.every_n_epochs = every_n_epochs
        self.rows: list[dict[str, Any]] = []

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> Any:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget what was measured (a checkpoint's analysis starts afresh)."""
        self.rows = []

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path or any(r["when"] == "init" for r in self.rows):
            return  # resumed: these weights are not the initial ones
        self.measure(trainer, pl_module, "init")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self.measure(trainer, pl_module, f"epoch{trainer.current_epoch}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.measure(trainer, pl_module, "trained")
        if trainer.is_global_zero:
            log_rows(trainer, self.table, self.columns, self.rows)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if on_a_checkpoint(trainer):
            self.reset()
            self.measure(trainer, pl_module, "checkpoint")
            if trainer.is_global_zero:
                log_rows(trainer, self.table, self.columns, self.rows)
