"""The base class of every user-facing error (see ``data_tools.errors.UserError``). Each layer defines its
own subclass (ConfigError, LaunchError, CheckpointError, ...); the CLI catches them by this type, so a
renamed or new subclass is still reported as one line."""

from data_tools.errors import DataError, UserError

__all__ = ["DataError", "UserError"]
