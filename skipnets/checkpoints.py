"""Checkpoints that survive faults and say clearly when they cannot be used.

- :class:`AtomicCheckpointIO` writes every checkpoint beside its target and renames it into place,
  so a kill while saving leaves the previous checkpoint loadable. It loads with
  ``weights_only=True``: a checkpoint that holds arbitrary pickled objects is refused unless the
  user passes ``--weights_only false`` (unpickling runs code from the file).
- :class:`LastCheckpoint` keeps ``last.ckpt`` at most ``every_n_train_steps`` steps old and writes
  it at the end of every training epoch.
- :func:`read_checkpoint` / :func:`check_checkpoint` turn unreadable, truncated, unsafe or
  mismatched checkpoints into one-line :class:`~skipnets.errors.ConfigError` messages;
  :func:`find_last_checkpoint` finds the one ``--ckpt_path last`` means.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from skipnets.errors import CheckpointWriteError, ConfigError
from skipnets.runs import is_running

__all__ = [
    "DEFAULT_LAST_EVERY_N_STEPS",
    "PREEMPTED_EXIT_CODE",
    "AtomicCheckpointIO",
    "LastCheckpoint",
    "check_checkpoint",
    "find_best_checkpoint",
    "find_last_checkpoint",
    "install_atomic_checkpoints",
    "read_checkpoint",
]

DEFAULT_LAST_EVERY_N_STEPS = 500
#: The exit status of a run stopped by SIGTERM (128 + 15, what a shell reports for it).
PREEMPTED_EXIT_CODE = 143
PARTIAL_SUFFIX = ".partial"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints that are never half-written, loaded without unpickling arbitrary objects.

    ``torch.save`` streams into ``<name>.<pid>.partial`` in the target's own directory (one side
    file per writing process, so two runs never share one; a rename across
    file systems would be a copy, and a copy can be cut short), the file is synced to disk, then
    renamed over the target. A kill at any moment leaves either the old or the new checkpoint,
    both complete. A save that fails (a full disk, a read-only folder) removes its side file and
    stops the run with :class:`~skipnets.errors.CheckpointWriteError`. Remote paths (``s3://``
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
        partial = target.with_name(f"{target.name}.{os.getpid()}{PARTIAL_SUFFIX}")
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
        except BaseException as err:
            with contextlib.suppress(OSError):
                partial.unlink()
            if isinstance(err, OSError):
                raise CheckpointWriteError(_write_failure(target, err)) from None
            raise
        _fsync_directory(target.parent)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return super().load_checkpoint(
            path,
            map_location=map_location or (lambda storage, loc: storage),
            weights_only=True if weights_only is None else weights_only,
        )


def _write_failure(target: Path, err: OSError) -> str:
    reason = err.strerror or str(err) or type(err).__name__
    kept = (
        f"the previous {target.name} there is intact"
        if target.is_file()
        else f"no earlier {target.name} exists there"
    )
    others = sorted(p.name for p in target.parent.glob("*.ckpt") if p != target)
    if others:
        kept += f" (other checkpoints: {', '.join(others[:4])})"
    return f"could not write the checkpoint {target}: {reason}; {kept}. Free space or choose another --trainer.default_root_dir"


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
    """Keeps ``last.ckpt`` fresh: every ``every_n_train_steps`` optimizer steps, at the end of
    every ``every_n_epochs``-th training epoch (after its validation) and when training ends, so
    a killed run loses at most that many steps.

    .. code-block:: yaml

        last_checkpoint_every_n_steps: 200     # the CLI's switches for the default instance
        last_checkpoint_every_n_epochs: 1

    Args:
        every_n_train_steps: steps between saves within an epoch; 0: none within an epoch.
        every_n_epochs: epochs between epoch-end saves; 0: only when training ends (speed runs,
            whose epochs take less time than writing the checkpoint).
        dirpath: where ``last.ckpt`` goes; by default the run's ``checkpoints/`` folder.
    """

    def __init__(
        self,
        every_n_train_steps: int = DEFAULT_LAST_EVERY_N_STEPS,
        dirpath: str | None = None,
        every_n_epochs: int = 1,
    ) -> None:
        if every_n_train_steps < 0:
            raise ConfigError(
                f"last_checkpoint_every_n_steps must be >= 0 (0: only at epoch ends), "
                f"got {every_n_train_steps}"
            )
        if every_n_epochs < 0:
            raise ConfigError(
                f"last_checkpoint_every_n_epochs must be >= 0 (0: only when training ends), "
                f"got {every_n_epochs}"
            )
        self.every_n_epochs_last = every_n_epochs
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
        if trainer.received_sigterm and trainer.world_size == 1:
            # Alone, Lightning would train on to the end of the epoch before stopping, and a
            # cluster kills a job a few seconds after its SIGTERM. (Under DDP the ranks agree on
            # the signal before the next batch, and stop there.)
            raise SIGTERMException

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:  # type: ignore[override]
        """On SIGTERM (a cluster's notice that it is about to stop the job), ``last.ckpt`` is
        written at the step training stopped at, on every rank together, and the run ends with
        exit status 143 (``skipnets.cli`` prints where the checkpoint is)."""
        if not isinstance(exception, SIGTERMException) or self._skip(trainer):
            return
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        exception.code = PREEMPTED_EXIT_CODE
        exception.checkpoint = self.last_model_path  # type: ignore[attr-defined]
        exception.step = trainer.global_step  # type: ignore[attr-defined]

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        # Saved even when a step save hit the same global step: the epoch-end state (validation
        # done, epoch counted, scheduler due) is the one to resume from.
        every, epoch = self.every_n_epochs_last, trainer.current_epoch + 1
        final = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if (final or (every and epoch % every == 0)) and not self._skip(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        # A run stopped by max_steps, early stopping or a signal ends with its last state saved.
        if not self._skip(trainer) and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        return


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
        f"{path} is damaged: not a readable checkpoint, truncated or corrupt (the reader "
        f"said: {reason[:120]}). Use another checkpoint, e.g. the run's last.ckpt or its best one"
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
    of a run that is not still running (W&B's own folders are not searched), or ``None``.
    When every run that has one is still running, a :class:`ConfigError` says so."""
    candidates = list(_checkpoint_files(Path(root)))
    idle = [path for path in candidates if not _still_running(path)]
    if candidates and not idle:
        raise ConfigError(
            f"--ckpt_path last: every run under {root} with a last checkpoint is still running "
            f"({', '.join(str(p.parent.parent) for p in candidates[:3])}); wait for it, or pass "
            "a checkpoint's path"
        )
    return max(idle, key=lambda p: p.stat().st_mtime) if idle else None


def find_best_checkpoint(root: str | os.PathLike) -> Path:
    """The best checkpoint (by validation accuracy, the one a run keeps beside ``last.ckpt``)
    of the most recent run under ``root``, or a :class:`ConfigError` when there is none."""
    best = [
        path
        for path in Path(root).rglob("checkpoints/*.ckpt")
        if not path.name.startswith(("last", "hpc_ckpt_")) and "wandb" not in path.parts
    ]
    if not best:
        raise ConfigError(
            f"--ckpt_path best: no best checkpoint under {root} (a run keeps one in "
            "<run dir>/checkpoints/ when it validates); pass a checkpoint's path"
        )
    return max(best, key=lambda p: p.stat().st_mtime)


def _still_running(checkpoint: Path) -> bool:
    # last.ckpt lives in <run dir>/checkpoints/; an hpc checkpoint at the root is SLURM's own
    # requeued job, which Lightning resumes in the same directory.
    if checkpoint.parent.name != "checkpoints":
        return False
    return is_running(checkpoint.parent.parent)


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
