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

    def __init__(self) -> None:
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
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Restored here, after the sanity check and loader set-up, right where the interrupted
        # run stood when it saved: the next draw is the next batch's.
        pending, self._pending = self._pending, None
        if pending and pending.get("rng") and pending.get("world_size") == trainer.world_size:
            _set_rng_state(pending["rng"])
        _count_batches_as_the_trainer_does(trainer)


def _count_batches_as_the_trainer_does(trainer: L.Trainer) -> None:
    """Tell resuming train loaders how many batches of the epoch the trainer counts as done,
    read when the epoch continues (after the loop has settled a step cut short by a signal)."""
    from skipnets.data.base import ResumableLoader

    loaders = trainer.train_dataloader
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    for loader in loaders:
        if isinstance(loader, ResumableLoader) and loader.resuming:
            loader.consumed = lambda: trainer.fit_loop.epoch_loop.batch_progress.current.ready


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
