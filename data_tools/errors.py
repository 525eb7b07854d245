"""The user-facing error types: :class:`UserError` is the base of every error the command line prints as
one line (exit 2) rather than a traceback; :class:`DataError` is the one for bad corpus input, bad shards
and mismatched manifests. ``data_tools`` depends on nothing of ``dist_cacheaug``, so the base lives here
and ``dist_cacheaug.errors`` re-exports it."""


class UserError(Exception):
    """A problem the user can fix (bad config, data, checkpoint, prompt, launch): the message names the
    thing and what to do. The CLI catches this type and prints ``error: <message>``; anything else is a
    bug and keeps its traceback."""


class DataError(UserError, ValueError):
    """A clear, user-facing data problem (names the file, field or shard). The CLI exits 2 on it."""
