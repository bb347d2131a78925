"""Where a run's files go. Everything a run writes lands under ``trainer.default_root_dir``."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L


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
