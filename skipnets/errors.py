"""Errors a user can cause and fix: the CLI prints their message and exits with their
``exit_code`` (2 for a bad input)."""


class SkipnetsError(Exception):
    """Base class for user-facing errors (bad config, unknown name, unusable checkpoint)."""

    exit_code = 2


class ConfigError(SkipnetsError, ValueError):
    """A value in a config or a call that cannot work; the message says what to change."""


class CheckpointWriteError(SkipnetsError, OSError):
    """A checkpoint could not be written (disk full, no permission, read-only file system): no
    partial file is left, and the message names the last good checkpoint."""

    exit_code = 74  # EX_IOERR


class UnknownModelError(SkipnetsError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""
