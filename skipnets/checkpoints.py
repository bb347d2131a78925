"""Checkpoints that survive faults and say clearly when they cannot be used.

- :class:`AtomicCheckpointIO` writes every checkpoint beside its target and renames it into place,
  so a kill while saving leaves the previous checkpoint loadable. It loads with
  ``weights_only=True``: a checkpoint that holds arbitrary pickled objects is refused unless the
  user passes ``--weights_only false`` (unpickling runs code from the file).
- Before a checkpoint is put in place, :func:`wandb_history_on_disk` waits until the W&B run's
  ``.wandb`` file holds every metric logged so far, so a run killed at any moment has, in its
  W&B files, everything its checkpoints cover (:func:`with_wandb_flush_interval` makes W&B write
  that file often enough for the wait to be short).
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
import struct
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from skipnets.errors import CheckpointWriteError, ConfigError
from skipnets.runs import is_running

__all__ = [
    "DEFAULT_LAST_EVERY_N_STEPS",
    "PREEMPTED_EXIT_CODE",
    "WANDB_FLUSH_ENV",
    "WANDB_FLUSH_INTERVAL",
    "AtomicCheckpointIO",
    "BestCheckpoint",
    "LastCheckpoint",
    "check_checkpoint",
    "find_best_checkpoint",
    "find_last_checkpoint",
    "install_atomic_checkpoints",
    "read_checkpoint",
    "wandb_history_on_disk",
    "with_wandb_flush_interval",
]

DEFAULT_LAST_EVERY_N_STEPS = 500
#: The exit status of a run stopped by SIGTERM (128 + 15, what a shell reports for it).
PREEMPTED_EXIT_CODE = 143
PARTIAL_SUFFIX = ".partial"
#: Seconds between W&B's writes of a run's ``.wandb`` file, for the runs the CLI starts (W&B's own
#: default is 15): a checkpoint waits at most about this long for the metrics it covers.
WANDB_FLUSH_INTERVAL = 0.05
#: W&B's environment variable for ``x_transaction_log_flush_interval``.
WANDB_FLUSH_ENV = "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints that are never half-written, loaded without unpickling arbitrary objects.

    ``torch.save`` streams into ``<name>.<pid>.partial`` in the target's own directory (one side
    file per writing process, so two runs never share one; a rename across
    file systems would be a copy, and a copy can be cut short), the file is synced to disk, then
    renamed over the target. A kill at any moment leaves either the old or the new checkpoint,
    both complete. A save that fails (a full disk, a read-only folder) removes its side file and
    stops the run with :class:`~skipnets.errors.CheckpointWriteError`. Remote paths (``s3://``
    and the like) keep Lightning's own upload, which is atomic per object.

    Before the rename (or the upload) it waits for :func:`wandb_history_on_disk`: a checkpoint in
    place never covers a logged metric that the W&B run's file lacks. A save made inside
    :meth:`held` is written and synced but put in place only by :meth:`release` (or the next
    save), once the metrics that Lightning logs after the checkpoint hook have been logged.
    """

    def __init__(self) -> None:
        super().__init__()
        self._holding = False
        self._held: tuple[Path, Path] | None = None  # (side file, target) not yet in place
        self._swept: set[Path] = set()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        self.release()  # checkpoints go into place in the order they were saved
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            wandb_history_on_disk()
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target not in self._swept:
            self._swept.add(target)
            _discard_orphans(target)
        partial = target.with_name(f"{target.name}.{os.getpid()}{PARTIAL_SUFFIX}")
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
        except BaseException as err:
            _discard(partial)
            if isinstance(err, OSError):
                raise CheckpointWriteError(_write_failure(target, err)) from None
            raise
        if self._holding:
            self._held = (partial, target)
        else:
            self._put_in_place(partial, target)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Saves made inside are put in place by the next :meth:`release` or save."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False

    def release(self) -> None:
        """Put a held checkpoint in place, if there is one."""
        if self._held is not None:
            partial, target = self._held
            self._held = None
            self._put_in_place(partial, target)

    def _put_in_place(self, partial: Path, target: Path) -> None:
        wandb_history_on_disk()
        try:
            os.replace(partial, target)
        except OSError as err:
            _discard(partial)
            raise CheckpointWriteError(_write_failure(target, err)) from None
        _fsync(target.parent)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return super().load_checkpoint(
            path,
            map_location=map_location or (lambda storage, loc: storage),
            weights_only=True if weights_only is None else weights_only,
        )


def _discard(partial: Path) -> None:
    with contextlib.suppress(OSError):
        partial.unlink()


def _discard_orphans(target: Path) -> None:
    """Remove the side files of ``target`` left by processes that were killed before putting
    them in place (a kill while saving, or while a save was held)."""
    prefix = f"{target.name}."
    for side in target.parent.glob(f"*{PARTIAL_SUFFIX}"):
        pid = side.name[len(prefix) : -len(PARTIAL_SUFFIX)]
        if side.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            _discard(side)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but belongs to someone else
        return True
    return True


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


def _fsync(path: Path | str) -> None:
    """Sync a file, or a folder (which makes a rename in it durable), to disk; where the
    platform does not let it be opened, nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
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


def with_wandb_flush_interval(settings: Any) -> Any:
    """Have W&B write the run's ``.wandb`` file every :data:`WANDB_FLUSH_INTERVAL` seconds,
    unless ``settings`` (the logger's: ``None``, a mapping or a ``wandb.Settings``) or the
    environment already set ``x_transaction_log_flush_interval``; returns the settings the
    config gave (:func:`_given_wandb_settings`).

    W&B's service keeps what a run logs in memory and writes it into the run's ``.wandb`` file
    when a 32 KiB block fills, every ``x_transaction_log_flush_interval`` seconds (15 by default)
    and when the run finishes; a killed run loses what was not written. No call asks for a
    write, so :func:`wandb_history_on_disk` waits for the next periodic one. The interval goes
    into W&B's own environment variable (``WANDB__TRANSACTION_LOG_FLUSH_INTERVAL``), which the
    processes the run starts (DDP ranks) inherit, not into the settings: the run's saved
    ``config.yaml`` keeps only what the user wrote.
    """
    if hasattr(settings, "as_dict"):  # jsonargparse's reading of a `settings:` mapping
        settings = _given_wandb_settings(settings.as_dict())
    if hasattr(settings, "model_fields_set"):  # a wandb.Settings
        given: Any = settings.model_fields_set
    else:
        given = settings or {}
    if "x_transaction_log_flush_interval" not in given:
        os.environ.setdefault(WANDB_FLUSH_ENV, str(WANDB_FLUSH_INTERVAL))
    return settings


def _given_wandb_settings(parsed: dict[str, Any]) -> dict[str, Any]:
    """The W&B settings a config gave, from jsonargparse's reading of them.

    A ``settings:`` mapping in a config is read as a whole ``wandb.Settings``, every field at its
    default as well: ``mode: online`` among them, which would send a run without credentials to
    W&B's servers (and fail) although the CLI asks for an offline run. Only the fields that
    differ from W&B's defaults are the config's."""
    import wandb

    fields = wandb.Settings.model_fields

    def same(value: Any, default: Any) -> bool:
        as_list = (list(v) if isinstance(v, (list, tuple)) else v for v in (value, default))
        return next(as_list) == next(as_list)

    given = {}
    for name, value in parsed.items():
        field = fields.get(name)
        if field is None or type(value) is object:  # not a field, or an unset-marker default
            continue
        if not same(value, field.get_default(call_default_factory=True)):
            given[name] = value
    return given


def wandb_history_on_disk(timeout: float = 30.0) -> bool:
    """Wait until every metric this process's W&B run has logged is in the run's ``.wandb`` file,
    synced to disk. True when it is, or when there is no W&B run (nothing imported W&B, another
    rank, a disabled run, a run that keeps no file); False, with a warning, when it could not be
    confirmed within ``timeout`` seconds. Costs one round trip to W&B's service when nothing new
    was logged since the last call.

    ``run.step``, the step of the next ``log`` call, comes from W&B's service after it has taken
    in every earlier call, in order; each logged step is one history record in the file, which
    the service only appends to. So the file holds everything logged once it holds the record
    of step ``run.step - 1``.
    """
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None)
    if run is None:
        return True
    try:
        settings = run.settings
        if run.disabled or settings.x_skip_transaction_log:
            return True
        interval = float(settings.x_transaction_log_flush_interval or 0)
        path = settings.sync_file
        written = _WRITTEN.get(path) or _WRITTEN.setdefault(path, _WrittenHistory(path))
        last = run.step - 1
        if last < run.starting_step or last <= written.step:
            return True
    except Exception as err:  # a run in W&B's shared mode has no step; a service that is gone
        _warn_once(f"the W&B run's logged metrics could not be checked before a checkpoint: {err}")
        return False
    if interval <= 0:
        _warn_once(
            "W&B writes this run's .wandb file only when a block fills or the run ends "
            "(x_transaction_log_flush_interval=0): a killed run may lose metrics its checkpoints "
            f"cover; set it to e.g. {WANDB_FLUSH_INTERVAL} in the logger's settings"
        )
        return False
    limit = max(timeout, 3 * interval)
    deadline = time.monotonic() + limit
    while written.read() < last:
        if time.monotonic() > deadline:
            _warn_once(
                f"W&B had not written step {last} of its run into {path} within {limit:.0f} s; "
                "the checkpoint is written anyway"
            )
            return False
        time.sleep(min(interval / 5, 0.01))
    _fsync(written.path)
    return True


_WRITTEN: dict[str, _WrittenHistory] = {}
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        rank_zero_warn(message)


class _WrittenHistory:
    """The last history step that W&B's service has written into a run's ``.wandb`` file, read
    on from where the previous read stopped.

    The file is a LevelDB-style log: a 7-byte header (``:W&B``, two magic bytes, a version), then
    32 KiB blocks of chunks, each a 7-byte header (CRC-32 of the type byte and the data, length,
    type: 1 whole record, 2/3/4 first/middle/last piece) and its data; the rest of a block too
    small for a header is padding. Each record is a ``wandb.proto`` ``Record``. A chunk whose CRC
    does not match is one still being written: the read stops there and the next one retries.
    """

    BLOCK = 32 * 1024
    HEADER = 7

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = self.HEADER  # just past the last whole chunk read
        self.pieces: list[bytes] = []  # the chunks of a record read so far
        self.step = -1

    def read(self) -> int:
        from wandb.proto import wandb_internal_pb2

        try:
            with open(self.path, "rb") as file:
                if file.read(4) != b":W&B":
                    return self.step
                file.seek(self.offset)
                data = file.read()
        except OSError:
            return self.step
        start, position = self.offset, 0
        while True:
            room = self.BLOCK - (start + position) % self.BLOCK
            if room < self.HEADER:
                if position + room > len(data):
                    break
                position += room
                continue
            if position + self.HEADER > len(data):
                break
            crc, length, kind = struct.unpack_from("<IHB", data, position)
            if kind == 0 and length == 0:  # a zero-filled end of a block
                position += room
                continue
            end = position + self.HEADER + length
            piece = data[position + self.HEADER : end]
            if end > len(data) or zlib.crc32(bytes([kind]) + piece) != crc:
                break
            position = end
            self.offset = start + position
            self.pieces.append(piece)
            if kind in (1, 4):
                record = wandb_internal_pb2.Record.FromString(b"".join(self.pieces))
                self.pieces = []
                if record.HasField("history"):
                    self.step = max(self.step, record.history.step.num)
        return self.step


class _Checkpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose ``state_key`` is built once. Lightning names each callback in
    every one of its hook calls, about ten per training step, and ``ModelCheckpoint`` builds its
    name anew each time from five settings (a few microseconds, on the host, every step)."""

    @property
    def state_key(self) -> str:
        settings = (
            self.monitor,
            self.mode,
            self._every_n_train_steps,
            self._every_n_epochs,
            self._train_time_interval,
        )
        cached = self.__dict__.get("_state_key")
        if cached is None or cached[0] != settings:
            cached = self._state_key = (settings, super().state_key)
        return cached[1]


class BestCheckpoint(_Checkpoint):
    """The best checkpoint by ``monitor`` (every run's: ``val/acc``, highest), a tie going to the
    lower ``tie_break`` (``val/loss``). On a small validation split the accuracy saturates
    (every one of the digits' 180 validation images right from the second epoch of the
    quickstart on), and Lightning's own rule, keeping the first of equal scores, would test the
    least trained of those epochs."""

    def __init__(self, *args: Any, tie_break: str = "val/loss", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tie_break = tie_break
        self.best_tie_value: float | None = None

    def check_monitor_top_k(self, trainer: L.Trainer, current: Any = None) -> bool:
        if super().check_monitor_top_k(trainer, current):
            return True
        if current is None or self.save_top_k != 1 or self.best_tie_value is None:
            return False
        tie = trainer.callback_metrics.get(self.tie_break)
        best = self.best_k_models.get(self.kth_best_model_path)
        # Values reduced across ranks (torchmetrics), so every rank decides the same.
        return (
            tie is not None
            and best is not None
            and float(current) == float(best)
            and float(tie) < self.best_tie_value
        )

    def _update_best_and_save(self, current: Any, trainer: L.Trainer, monitor_candidates: Any):
        tie = monitor_candidates.get(self.tie_break)
        self.best_tie_value = None if tie is None else float(tie)
        super()._update_best_and_save(current, trainer, monitor_candidates)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_tie_value": self.best_tie_value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.best_model_path == state_dict.get("best_model_path"):
            self.best_tie_value = state_dict.get("best_tie_value")


class LastCheckpoint(_Checkpoint):
    """Keeps ``last.ckpt`` fresh: every ``every_n_train_steps`` optimizer steps, at the end of
    every ``every_n_epochs``-th training epoch (after its validation) and when training ends, so
    a killed run loses at most that many steps. A save within an epoch goes into place at the
    start of the next step (:meth:`AtomicCheckpointIO.held`), once Lightning has logged the
    metrics of the step it saved, so that W&B's file holds them before the checkpoint does.

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

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[override]
        _release(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        every = self._every_n_train_steps
        due = every and trainer.global_step % every == 0
        if due and not self._skip(trainer) and self._last_global_step_saved != trainer.global_step:
            # Lightning logs this step's metrics after this hook: the checkpoint goes into place
            # at the next hook, once W&B's file holds them too.
            with _held(trainer):
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
        _release(trainer)
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
        _release(trainer)
        every, epoch = self.every_n_epochs_last, trainer.current_epoch + 1
        final = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if (final or (every and epoch % every == 0)) and not self._skip(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        # A run stopped by max_steps, early stopping or a signal ends with its last state saved.
        _release(trainer)
        if not self._skip(trainer) and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        return

    def teardown(self, trainer, pl_module, stage: str) -> None:  # type: ignore[override]
        _release(trainer)
        super().teardown(trainer, pl_module, stage)


def _held(trainer: L.Trainer) -> contextlib.AbstractContextManager[None]:
    checkpoint_io = trainer.strategy.checkpoint_io
    if isinstance(checkpoint_io, AtomicCheckpointIO):
        return checkpoint_io.held()
    return contextlib.nullcontext()


def _release(trainer: L.Trainer) -> None:
    checkpoint_io = trainer.strategy.checkpoint_io
    if isinstance(checkpoint_io, AtomicCheckpointIO):
        checkpoint_io.release()


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
