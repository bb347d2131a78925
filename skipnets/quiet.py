"""A quiet terminal: the lines the wrapped frameworks print on every command that tell a skipnets
user nothing, filtered one by one by their exact text.

Only these lines go; a user's own warnings and the frameworks' real problems still show.
``SKIPNETS_VERBOSE=1`` shows everything.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

__all__ = ["NOISE", "VERBOSE_ENV", "quiet_frameworks"]

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
