"""Where a run's files go. Everything a run writes lands under ``trainer.default_root_dir``.

Plugins hand their outputs to the run's tracker with :func:`log_figure` (a PNG becomes a W&B
image) and :func:`log_table` (rows or a CSV become a W&B table); with other loggers, or none,
the files in the run directory are the record.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn


def run_dir(trainer: L.Trainer) -> Path:
    """The directory of this run: ``<save_dir>/<logger name>/<version>``, the parent of its
    ``checkpoints/`` folder, or ``default_root_dir`` when there is no logger.

    Plugins write their files under it (``run_dir(trainer) / "lesion"``); the resolved config is
    saved there as ``config.yaml``. Only call it on rank zero with W&B: other ranks have no run id.
    """
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    save_dir = logger.save_dir or trainer.default_root_dir
    version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return Path(save_dir) / str(logger.name) / version


def trained_run_dir(checkpoint: str | os.PathLike) -> Path:
    """The run a checkpoint belongs to: the folder holding its ``checkpoints/`` folder, or the
    checkpoint's own folder for a checkpoint kept elsewhere."""
    folder = Path(checkpoint).resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def plugin_dir(trainer: L.Trainer, plugin: str) -> Path:
    """Where a plugin writes its files: ``run_dir(trainer) / plugin``, created. Call it on rank
    zero only.

    A standalone evaluation of a checkpoint (``skipnets analyse``, ``trainer.validate(...,
    ckpt_path=...)``) writes into ``<plugin>/<checkpoint name>/`` instead, beside what the
    training run recorded there, never over it.
    """
    path = run_dir(trainer) / plugin
    if trainer.state.fn != TrainerFn.FITTING and trainer.ckpt_path:
        path = path / Path(trainer.ckpt_path).stem
    path.mkdir(parents=True, exist_ok=True)
    return path


#: The file a training run holds locked in its run directory while it runs.
LOCK_FILE = ".running"


class RunLock:
    """An exclusive lock on a run directory, held while a ``fit`` trains into it.

    A second process that would train into the same directory (two resumes of one run started
    together, or two runs with the same ``default_root_dir`` and no logger) is refused with one
    line instead of overwriting the first one's checkpoints, config and ``run.json``; and
    ``--ckpt_path last`` passes over runs that are still running. The lock is the operating
    system's (``flock``): it goes when the process ends, however it ends. Where there is no
    ``flock`` (Windows), runs are not locked.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / LOCK_FILE
        self._file: Any = None

    def acquire(self) -> None:
        from skipnets.errors import ConfigError

        if fcntl is None or self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open while the run lasts
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"the run directory {self.path.parent} is in use by {holder}, which is still "
                "training into it; wait for it to finish, or start a new run (another "
                "--trainer.default_root_dir, or no --ckpt_path)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the lock
            self._file = None
            with contextlib.suppress(OSError):
                self.path.unlink()


def is_running(directory: str | os.PathLike) -> bool:
    """Whether a process holds the run lock of ``directory``."""
    path = Path(directory) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def wandb_has_credentials() -> bool:
    """Whether W&B could log in without asking: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _wandb_loggers(trainer: L.Trainer) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def log_figure(trainer: L.Trainer, key: str, path: str | os.PathLike) -> None:
    """Log the image file at ``path`` (PNG, JPEG) as the W&B image ``key``, at the current
    step. Does nothing without a W&B logger or off rank zero; the file itself stays where it is.
    """
    for logger in _wandb_loggers(trainer):
        logger.log_image(key=key, images=[str(path)])


def log_table(
    trainer: L.Trainer,
    key: str,
    data: Any,
    columns: Sequence[str] | None = None,
) -> None:
    """Log a table as the W&B table ``key``. ``data`` is a pandas ``DataFrame``, the path of a CSV
    file (header row first), a sequence of dicts (columns: their keys, in first-seen order), or
    a sequence of rows together with ``columns``. Does nothing without a W&B logger or off rank
    zero."""
    loggers = _wandb_loggers(trainer)
    if not loggers:
        return
    if hasattr(data, "columns") and hasattr(data, "itertuples"):
        for logger in loggers:
            logger.log_table(key=key, dataframe=data)
        return
    if isinstance(data, (str, os.PathLike)):
        with open(data, newline="") as file:
            reader = csv.reader(file)
            columns = next(reader, [])
            rows = [[_number(cell) for cell in row] for row in reader]
    else:
        data = list(data)
        if data and isinstance(data[0], Mapping):
            names: dict[str, None] = {}
            for row in data:
                names.update(dict.fromkeys(row))
            columns = list(names)
            rows = [[row.get(name) for name in columns] for row in data]
        else:
            if columns is None:
                raise ValueError("log_table needs columns= when the rows are not dicts")
            rows = [list(row) for row in data]
    for logger in loggers:
        logger.log_table(key=key, columns=list(columns), data=rows)


def _number(cell: str) -> Any:
    for kind in (int, float):
        try:
            return kind(cell)
        except ValueError:
            pass
    return cell


def git_commit(path: str | os.PathLike | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout that holds ``path`` (default: the skipnets
    package), or ``(None, None)`` when it is not a tracked file of a git checkout."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    directory = where if where.is_dir() else where.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(directory), *args],
                capture_output=True,
                text=True,
                timeout=5,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # An installed copy inside some other repository (a virtualenv in a project) is not "the
    # code at that commit": the file itself must be tracked.
    probe = where if where.is_file() else where / "__init__.py"
    if git("ls-files", "--error-unmatch", str(probe)) is None:
        return None, None
    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, bool(status) if status is not None else None


def run_metadata(pl_module: L.LightningModule) -> dict[str, Any]:
    """What identifies a run's model and code: registry name, parameter count, skipnets version,
    git commit (and whether the checkout had uncommitted changes)."""
    from skipnets import __version__

    info: dict[str, Any] = {"skipnets_version": __version__}
    hparams = getattr(pl_module, "hparams", {})
    arch = hparams.get("arch") if hasattr(hparams, "get") else None
    if arch:
        info["arch"] = arch
    info["parameters"] = sum(p.numel() for p in pl_module.parameters())
    commit, dirty = git_commit()
    if commit:
        info["git_commit"] = commit
        info["git_dirty"] = dirty
    return info


def offline_folders(wandb_dir: Path, run_id: str) -> list[Path]:
    """Every folder W&B wrote for offline run ``run_id`` under ``wandb_dir``, oldest first: one
    per start of the run, named ``offline-run-<time>-<id>``, with ``-1``, ``-2`` ... added when
    a resume starts within the same second as an earlier start."""
    pattern = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?")
    found = [p for p in wandb_dir.glob("offline-run-*") if pattern.fullmatch(p.name)]
    return sorted(found, key=lambda p: (p.name.split("-")[2], _suffix(p.name, run_id)))


def _suffix(name: str, run_id: str) -> int:
    tail = name.rpartition(run_id)[2]
    return int(tail[1:]) if tail.startswith("-") else 0


def wandb_run_info(trainer: L.Trainer) -> dict[str, Any] | None:
    """Where this run's W&B data is: id, project, mode, URL or local folders and the command
    that uploads them (every folder of a resumed offline run, oldest first). Rank zero only."""
    for logger in _wandb_loggers(trainer):
        experiment = logger.experiment
        # W&B calls a run without credentials "dryrun" and one set offline "offline": both
        # are offline runs, which its public ``offline`` property says.
        if getattr(experiment.settings, "mode", None) == "disabled":
            mode = "disabled"
        else:
            mode = "offline" if experiment.offline else "online"
        info: dict[str, Any] = {"id": experiment.id, "project": experiment.project, "mode": mode}
        if mode == "disabled":
            return info
        this = Path(experiment.dir).parent
        if mode == "offline":
            folders = offline_folders(this.parent, experiment.id) or [this]
            info["folders"] = [str(folder) for folder in folders]
            info["sync"] = "wandb sync " + " ".join(info["folders"])
        else:
            info["folders"] = [str(this)]
            info["url"] = experiment.url
        return info
    return None


def write_run_record(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """Write ``<run dir>/run.json``: :func:`run_metadata` and :func:`wandb_run_info`. Rank zero
    only."""
    record = run_metadata(pl_module)
    wandb_info = wandb_run_info(trainer)
    if wandb_info is not None:
        record["wandb"] = wandb_info
    path = run_dir(trainer) / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record
