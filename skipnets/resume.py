"""What a resumed run needs beyond Lightning's own checkpoint state: the random number
generators, the W&B run it continues, and how far into its epoch the data had got.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from skipnets.errors import ConfigError
from skipnets.runs import RunLock, run_dir

__all__ = ["RunState"]


class RunState(Callback):
    """Saves with every checkpoint what a resumed run needs beyond Lightning's own state.

    - The global random number generators (Python, NumPy, torch CPU and the current CUDA
      device), restored when training restarts: with the epoch-seeded, position-aware train
      loader of :class:`skipnets.data.DataModule`, a resumed single-process run then repeats
      the uninterrupted one step for step. Under DDP the saved state is rank zero's; it is put on
      every rank, which is exact when ranks share a seed (``seed_everything``) and a batch shape.
    - The W&B run id and project, which the CLI passes back to W&B on resume.

    While ``fit`` runs, rank zero holds the run directory's lock (:class:`skipnets.runs.RunLock`):
    no second process trains into it, and ``--ckpt_path last`` passes it over.

    On resume it also tells a :class:`skipnets.data.base.ResumableLoader` how many batches of the
    interrupted epoch the trainer counts as done, which differs from the batches the loader had
    handed out when the checkpoint was written in the middle of a step (SLURM's signal).
    """

    def __init__(self, allow_changes: bool = False) -> None:
        self.allow_changes = allow_changes
        self._trainer: L.Trainer | None = None
        self._lock: RunLock | None = None
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage == "fit" and trainer.is_global_zero:
            self._lock = RunLock(run_dir(trainer))
            self._lock.acquire()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        return {
            "rng": _rng_state(),
            "world_size": trainer.world_size if trainer is not None else 1,
            "wandb": _wandb_identity(trainer) if trainer is not None else None,
            "settings": _settings(trainer) if trainer is not None else {},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # What the checkpoint's state means (the position in the epoch, the optimizer's moments,
        # the schedule's step) depends on these settings: a resume that changes them says so.
        pending = self._pending or {}
        saved = dict(pending.get("settings") or {})
        if "world_size" in pending:
            saved["world size"] = pending["world_size"]
        now = {**_settings(trainer), "world size": trainer.world_size}
        changed = [
            f"{key}: {_shown(saved[key])} -> {_shown(now[key])}"
            for key in now
            if key in saved and saved[key] != now[key]
        ]
        if not changed:
            return
        if not self.allow_changes:
            raise ConfigError(
                f"the checkpoint was trained with other settings ({'; '.join(changed)}), so its "
                "position in the epoch, optimizer state or schedule would mean something else. "
                "Resume with the run's own config.yaml, or pass --allow_resume_changes=true to "
                "go on with the new settings"
            )
        rank_zero_warn(
            f"resuming with changed settings ({'; '.join(changed)}): the epoch in progress "
            "continues from the same number of batches, the optimizer and schedule from their "
            "saved state under the new settings"
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Restored here, after the sanity check and loader set-up, right where the interrupted
        # run stood when it saved: the next draw is the next batch's.
        pending, self._pending = self._pending, None
        if pending and pending.get("rng") and pending.get("world_size") == trainer.world_size:
            _set_rng_state(pending["rng"])
        _count_batches_as_the_trainer_does(trainer)


def _settings(trainer: L.Trainer) -> dict[str, Any]:
    """The settings that give a checkpoint's training state its meaning."""
    datamodule = trainer.datamodule
    hparams = getattr(trainer.lightning_module, "hparams", {}) if trainer.lightning_module else {}
    settings: dict[str, Any] = {}
    if datamodule is not None:
        settings["data"] = type(datamodule).__name__
        settings["batch size"] = getattr(datamodule, "batch_size", None)
    if hasattr(hparams, "get"):
        for key in ("optimizer", "lr_scheduler"):
            settings[key] = _plain(hparams.get(key))
    return settings


def _shown(value: Any) -> str:
    # An optimizer or schedule as its class and arguments: SGD(lr=0.1, momentum=0.9).
    if isinstance(value, dict) and "class_path" in value:
        args = ", ".join(f"{k}={v}" for k, v in (value.get("init_args") or {}).items())
        return f"{str(value['class_path']).rpartition('.')[2]}({args})"
    return "the default" if value is None else str(value)


def _plain(value: Any) -> Any:
    # Namespaces and dicts from a config, as plain values that compare and print simply.
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _count_batches_as_the_trainer_does(trainer: L.Trainer) -> None:
    """Tell the data module of a resumed run how many batches of the epoch the trainer counts
    as done (``DataModule.continue_epoch``); read when the epoch continues."""
    continue_epoch = getattr(trainer.datamodule, "continue_epoch", None)
    if callable(continue_epoch):
        continue_epoch(lambda: trainer.fit_loop.epoch_loop.batch_progress.current.ready)


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _wandb_identity(trainer: L.Trainer) -> dict[str, str] | None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and isinstance(logger.version, str):
            return {"id": logger.version, "project": str(logger.name)}
    return None
