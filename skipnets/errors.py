"""Errors a user can cause and fix: the CLI prints their message and exits with status 2."""


class SkipnetsError(Exception):
    """Base class for user-facing errors (bad config, unknown name, unusable checkpoint)."""


class ConfigError(SkipnetsError, ValueError):
    """A value in a config or a call that cannot work; the message says what to change."""


class UnknownModelError(SkipnetsError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""
