"""The one exception type for bad corpus input, bad shards and mismatched manifests."""


class DataError(ValueError):
    """A clear, user-facing data problem (names the file, field or shard). The CLI exits 2 on it."""
