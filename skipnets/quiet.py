"""A quiet terminal: the lines the wrapped frameworks print on every command that tell a skipnets
user nothing, filtered one by one by their exact text.

Only these lines go; a user's own warnings and the frameworks' real problems still show.
``SKIPNETS_VERBOSE=1`` shows everything.

Lightning's lines (its log and its Python warnings) are listed in :data:`NOISE`; W&B prints its
own straight to the terminal (``wandb.termwarn``), and its lines are listed in
:data:`WANDB_NOISE`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

__all__ = ["NOISE", "VERBOSE_ENV", "WANDB_NOISE", "quiet_frameworks", "quiet_wandb"]

VERBOSE_ENV = "SKIPNETS_VERBOSE"

#: Each: a line of Lightning's (logged or warned) that says nothing to a skipnets user, and why.
NOISE: tuple[tuple[str, str], ...] = (
    (r"💡 Tip: .*litlogger", "an advertisement"),
    (r"GPU available: .*, used: ", "the run's device is in its config"),
    (r"TPU available: ", "the run's device is in its config"),
    (
        r"The dirpath has changed from .* therefore `best_model_score`",
        "loading a checkpoint in another run directory is what validate, test and analyse do",
    ),
    (
        r"Checkpoint directory .* exists and is not empty",
        "a resumed run writes into its own checkpoint folder",
    ),
    (
        r"It is recommended to use `self\.log\(.*sync_dist=True`",
        "skipnets logs torchmetrics' compute(), which is already reduced across ranks",
    ),
    (
        r"LightningCLI's args parameter is intended to run from within Python",
        "skipnets' own commands (analyse, lesion, deconvnet) call the CLI with their arguments",
    ),
    (
        r"isinstance\(treespec, LeafSpec\)` is deprecated",
        "inside Lightning's own code, nothing a user can change",
    ),
    (
        r"Precision (16|bf16)-mixed is not supported by the model summary",
        "mixed precision keeps the weights in float32, the size the summary then shows",
    ),
)

#: Each: a warning W&B prints on every run that says nothing to a skipnets user, and why.
WANDB_NOISE: tuple[tuple[str, str], ...] = (
    (
        r"^The anonymous setting has no effect and will be removed",
        "Lightning's WandbLogger passes W&B's retired `anonymous` argument on every run, whatever "
        "the config says; no setting of the logger leaves it out",
    ),
)


class _Drop(logging.Filter):
    def __init__(self, patterns: list[re.Pattern[str]]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.search(message) for pattern in self.patterns)


def quiet_frameworks() -> None:
    """Filter the lines of :data:`NOISE` from Lightning's log and warnings (unless
    ``SKIPNETS_VERBOSE`` is set). Safe to call more than once."""
    if os.environ.get(VERBOSE_ENV):
        return
    patterns = [re.compile(pattern) for pattern, _ in NOISE]
    drop = _Drop(patterns)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(drop)
        for handler in logger.handlers:
            if not any(isinstance(f, _Drop) for f in handler.filters):
                handler.addFilter(drop)
    for pattern, _ in NOISE:
        warnings.filterwarnings("ignore", message=f".*{pattern}")


def quiet_wandb(trainer: Any) -> None:
    """Before a run starts W&B: give each of the trainer's W&B loggers its folder, and filter
    the lines of :data:`WANDB_NOISE` from W&B's terminal warnings (unless ``SKIPNETS_VERBOSE``
    is set). Does nothing for a trainer without a W&B logger; safe to call more than once.

    W&B looks for the git checkout of the run from its folder and warns ``git root ... does not
    exist`` when the folder is not there yet (a first run into a new ``default_root_dir``); the
    folder is created here, after every check of the config and checkpoint has passed, so that
    W&B records the checkout of the folder the run writes in, as it does on a second run.
    """
    from lightning.pytorch.loggers import WandbLogger

    loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
    for logger in loggers:
        if logger.save_dir:
            Path(logger.save_dir).mkdir(parents=True, exist_ok=True)
    if not loggers or os.environ.get(VERBOSE_ENV) or trainer.global_rank != 0:
        return  # W&B starts on rank zero only
    import wandb

    if getattr(wandb.termwarn, "skipnets_quiet", False):
        return
    patterns = [re.compile(pattern) for pattern, _ in WANDB_NOISE]
    termwarn = wandb.termwarn

    @functools.wraps(termwarn)
    def filtered(string: str, *args: Any, **kwargs: Any) -> None:
        if not any(pattern.search(str(string)) for pattern in patterns):
            termwarn(string, *args, **kwargs)

    filtered.skipnets_quiet = True  # type: ignore[attr-defined]
    wandb.termwarn = filtered
