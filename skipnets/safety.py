"""Runs that survive faults: atomic checkpoints, a fresh ``last.ckpt``, exact resume, and a clean
stop when the loss stops being a number.

The CLI installs all of this by default:

- :class:`AtomicCheckpointIO` writes every checkpoint beside its target and renames it into place,
  so a kill while saving leaves the previous checkpoint loadable. It loads with
  ``weights_only=True``: a checkpoint that holds arbitrary pickled objects is refused unless the
  user passes ``--weights_only false`` (unpickling runs code from the file).
- :class:`LastCheckpoint` keeps ``last.ckpt`` at most ``every_n_train_steps`` steps old and writes
  it at the end of every training epoch.
- :class:`RunState` puts into every checkpoint what Lightning leaves out: the random number
  generators' states, for an exact resume, and the W&B run id, so a resumed run continues its
  W&B run.
- :class:`NonFiniteLossStop` stops training at the first loss that is nan or inf, before that
  step touches the weights, with a message that says what to change.
- :func:`read_checkpoint` / :func:`check_checkpoint` turn unreadable, truncated, unsafe or
  mismatched checkpoints into one-line :class:`~skipnets.errors.ConfigError` messages.
"""

from __future__ import annotations

import math
import os
import pickle
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from skipnets.errors import ConfigError, SkipnetsError

__all__ = [
    "DEFAULT_LAST_EVERY_N_STEPS",
    "AtomicCheckpointIO",
    "LastCheckpoint",
    "NonFiniteLossStop",
    "RunState",
    "TrainingDiverged",
    "check_checkpoint",
    "find_last_checkpoint",
    "install_atomic_checkpoints",
    "read_checkpoint",
]

DEFAULT_LAST_EVERY_N_STEPS = 500
PARTIAL_SUFFIX = ".partial"


class TrainingDiverged(SkipnetsError):
    """The loss became nan or inf; the message names the step and what to change."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints that are never half-written, loaded without unpickling arbitrary objects.

    ``torch.save`` streams into ``<name>.partial`` in the target's own directory (a rename across
    file systems would be a copy, and a copy can be cut short), the file is synced to disk, then
    renamed over the target. A kill at any moment leaves either the old or the new checkpoint,
    both complete; a stale ``.partial`` is overwritten by the next save. Remote paths (``s3://``
    and the like) keep Lightning's own upload, which is atomic per object.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + PARTIAL_SUFFIX)
        with open(partial, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, target)
        _fsync_directory(target.parent)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return super().load_checkpoint(
            path,
            map_location=map_location or (lambda storage, loc: storage),
            weights_only=True if weights_only is None else weights_only,
        )


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def install_atomic_checkpoints(trainer: L.Trainer) -> None:
    """Swap the strategy's plain ``TorchCheckpointIO`` for :class:`AtomicCheckpointIO`; a
    checkpoint IO the user configured (or a strategy's own, e.g. FSDP's) is left alone."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``last.ckpt`` fresh: every ``every_n_train_steps`` optimizer steps and at the end of
    every training epoch (after its validation), so a killed run loses at most that many steps.

    .. code-block:: yaml

        last_checkpoint_every_n_steps: 200     # the CLI's switch for the default instance

    Args:
        every_n_train_steps: steps between saves within an epoch; 0 saves only at epoch ends.
        dirpath: where ``last.ckpt`` goes; by default the run's ``checkpoints/`` folder.
    """

    def __init__(
        self, every_n_train_steps: int = DEFAULT_LAST_EVERY_N_STEPS, dirpath: str | None = None
    ) -> None:
        if every_n_train_steps < 0:
            raise ConfigError(
                f"last_checkpoint_every_n_steps must be >= 0 (0: only at epoch ends), "
                f"got {every_n_train_steps}"
            )
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps or None,
            every_n_epochs=None if every_n_train_steps else 1,
            enable_version_counter=False,
        )

    def _skip(self, trainer: L.Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.sanity_checking or trainer.state.fn != "fit"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        every = self._every_n_train_steps
        due = every and trainer.global_step % every == 0
        if due and not self._skip(trainer) and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        # Saved even when a step save hit the same global step: the epoch-end state (validation
        # done, epoch counted, scheduler due) is the one to resume from.
        if not self._skip(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        return


class RunState(Callback):
    """Saves with every checkpoint what a resumed run needs beyond Lightning's own state.

    - The global random number generators (Python, NumPy, torch CPU and the current CUDA
      device), restored when training restarts: with the epoch-seeded, position-aware train
      loader of :class:`skipnets.data.DataModule`, a resumed single-process run then repeats
      the uninterrupted one step for step. Under DDP the saved state is rank zero's; it is put on
      every rank, which is exact when ranks share a seed (``seed_everything``) and a batch shape.
    - The W&B run id and project, which the CLI passes back to W&B on resume.

    On resume it also tells a :class:`skipnets.data.base.ResumableLoader` how many batches of the
    interrupted epoch the trainer counts as done, which differs from the batches the loader had
    handed out when the checkpoint was written in the middle of a step (SLURM's signal).
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

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


class NonFiniteLossStop(Callback):
    """Stops training at the first nan or inf loss, before the backward pass and the optimizer
    step, so the weights (and every checkpoint written so far) stay those of the last good step.

    The run ends with :class:`TrainingDiverged`: the CLI prints its message (the step, what to
    try: a lower learning rate, a more negative highway gate bias, fewer layers) and exits with
    status 2. Under DDP the ranks agree before stopping, so none is left waiting.
    """

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        # One host read of the scalar loss (on a GPU, the step's one synchronisation).
        finite = math.isfinite(loss.item()) if loss.numel() == 1 else bool(loss.isfinite().all())
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            raise TrainingDiverged(_divergence_message(trainer, pl_module, loss))


def _divergence_message(
    trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
) -> str:
    from skipnets.nn import skip_blocks

    value = loss.detach().float().cpu()
    shown = "nan" if bool(torch.isnan(value).any()) else "inf"
    batch = trainer.fit_loop.epoch_loop.batch_idx + 1
    hparams = getattr(pl_module, "hparams", {})
    arch_kwargs = dict(hparams.get("arch_kwargs") or {}) if hasattr(hparams, "get") else {}
    lrs = sorted({group["lr"] for opt in trainer.optimizers for group in opt.param_groups})
    tips = [f"a lower learning rate (optimizer.init_args.lr, now {', '.join(map(str, lrs))})"]
    model = getattr(pl_module, "model", pl_module)
    if any(block.kind == "highway" for _, block in skip_blocks(model)):
        bias = arch_kwargs.get("gate_bias", _builder_default(hparams, "gate_bias"))
        tips.append(f"a more negative highway gate bias (model.arch_kwargs.gate_bias, now {bias})")
    if "depth" in arch_kwargs:
        tips.append(f"fewer layers (model.arch_kwargs.depth, now {arch_kwargs['depth']})")
    else:
        tips.append("a shallower model")
    tips.append("gradient clipping (trainer.gradient_clip_val)")
    last = ""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
            last = callback.last_model_path
    kept = (
        f"the last good checkpoint is {last} (resume with --ckpt_path last)"
        if last
        else "no checkpoint had been saved yet"
    )
    return (
        f"training diverged: the loss became {shown} at step {trainer.global_step} "
        f"(epoch {trainer.current_epoch}, batch {batch}); that step was not applied and "
        f"{kept}. Try {'; '.join(tips)}"
    )


def _builder_default(hparams: Any, name: str) -> Any:
    import inspect

    from skipnets.registry import model_info

    try:
        builder = model_info(hparams.get("arch")).builder
        return inspect.signature(builder).parameters[name].default
    except Exception:  # a model outside the registry: no default to show
        return "its default"


def read_checkpoint(path: str | os.PathLike, weights_only: bool = True) -> dict[str, Any]:
    """Load a Lightning checkpoint's contents (tensors memory-mapped where the format allows),
    or raise :class:`ConfigError` saying why it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}")
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # legacy (non-zip) checkpoints cannot be memory-mapped
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        # "Unsupported global": a well-formed pickle of objects; anything else is damage.
        if weights_only and "global" in str(err).lower():
            raise ConfigError(
                f"{path} holds Python objects beyond tensors and plain containers, and unpickling "
                "them runs code from the file; if you trust its source, load it with "
                "--weights_only false"
            ) from None
        raise ConfigError(_unreadable(path, err)) from None
    except Exception as err:  # damaged bytes fail in many ways (KeyError, IndexError, ...)
        raise ConfigError(_unreadable(path, err)) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{path} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def _unreadable(path: Path, err: BaseException) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"{path} is not a readable checkpoint; it may be truncated or corrupt ({reason[:160]}). "
        "Resume from another one, e.g. the run's last.ckpt or its best checkpoint"
    )


def check_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, weights_only: bool = True
) -> dict[str, Any]:
    """:func:`read_checkpoint`, then make sure its weights fit ``model``: a checkpoint of another
    architecture or size raises :class:`ConfigError` naming both."""
    checkpoint = read_checkpoint(path, weights_only)
    hint = "pass the config it was trained with (its run directory has config.yaml)"
    saved = _architecture(checkpoint.get("hyper_parameters"))
    wanted = _architecture(getattr(model, "hparams", None))
    if saved and wanted and saved != wanted:
        raise ConfigError(f"{path} holds a {saved} model but the config builds {wanted}: {hint}")
    state, expected = checkpoint["state_dict"], model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = sorted(
        key
        for key in expected.keys() & state.keys()
        if tuple(expected[key].shape) != tuple(state[key].shape)
    )
    problems = [
        f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("differently shaped", reshaped),
        )
        if keys
    ]
    if problems:
        raise ConfigError(f"{path} does not fit the model ({'; '.join(problems)}): {hint}")
    return checkpoint


def _architecture(hparams: Any) -> str | None:
    if not hasattr(hparams, "get") or not hparams.get("arch"):
        return None
    kwargs = dict(hparams.get("arch_kwargs") or {})
    return hparams["arch"] + (f" {kwargs}" if kwargs else "")


def find_last_checkpoint(root: str | os.PathLike) -> Path | None:
    """The most recently written ``last*.ckpt`` or SLURM ``hpc_ckpt_*.ckpt`` under ``root``
    (W&B's own folders are not searched), or ``None``."""
    candidates = [path for path in _checkpoint_files(Path(root))]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _checkpoint_files(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d != "wandb"]
        for name in files:
            at_root = Path(directory) == root
            if name.endswith(".ckpt") and (
                name.startswith("last") or (at_root and name.startswith("hpc_ckpt_"))
            ):
                yield Path(directory) / name
