"""The errors a user can act on. The command line prints these as one message (exit code 2);
anything else is a bug and keeps its traceback.

Each is also a `ValueError` (or `OSError`), so code written against the standard types keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Marks an error caused by an input or setting, with a message that says what to do."""


class ConfigError(UserError, ValueError):
    """A setting, argument or config file that cannot be used as given."""


class CheckpointError(UserError, ValueError):
    """A checkpoint's contents do not fit the tower (keys, shapes, config)."""


class WeightsUnavailableError(UserError, OSError):
    """The weights could not be found locally or fetched; the message says how to proceed. `name` and
    `reason`, where set (`checkpoints.offline_error`), let a caller say it again with its own alternative."""

    def __init__(self, message: str, name: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.name, self.reason = name, reason


class CacheError(UserError, ValueError):
    """A cache that cannot be used as asked: other settings, missing keys, a damaged shard."""


class ImageLoadError(UserError, ValueError):
    """An input could not be read as an image; the message names the input."""


class Interrupted(UserError):
    """A run stopped by Ctrl-C or SIGTERM; the message says what is kept and how to resume. `code` is
    the exit code the shell expects (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, code: int = 130) -> None:
        super().__init__(message)
        self.code = code


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM (by the command line's handler), so a run ends as on Ctrl-C."""
