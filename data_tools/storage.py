"""Where a shard directory lives: on a local (or shared) filesystem, or behind a URL.

A *location* is a directory path or one of

* ``s3://bucket/prefix`` (through fsspec + s3fs; credentials, region and endpoint from boto's usual
  environment and profile: ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL_S3`` ...),
* ``gs://bucket/prefix`` (fsspec + gcsfs, when installed; Google's application-default credentials),
* ``https://host/path`` / ``http://`` (fsspec's HTTP filesystem, aiohttp),
* ``pipe:CMD`` (webdataset's form: CMD writes the file to stdout; ``{name}`` in CMD is replaced by the
  file's name, e.g. ``pipe:aws s3 cp s3://b/shards/{name} -``).

Files are read whole (a shard is a few MiB to a few hundred MiB, and its sha256 is checked before any
sample of it is used). A transient failure (connection reset, timeout, 5xx, a short read) is retried
:attr:`Retry.attempts` times with exponential backoff, then one :class:`DataError` names the location.
A missing file is not retried. Nothing here logs or stores credentials: locations are kept as given
(do not put secrets in a URL; use the library's environment or profile).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from .errors import DataError

log = logging.getLogger(__name__)

URL_SCHEMES = ("s3://", "gs://", "gcs://", "http://", "https://")
PIPE = "pipe:"


@dataclass(frozen=True)
class Retry:
    """How reads of a remote file are retried (picklable: data workers carry it)."""

    attempts: int = 5  # reads in all, the first included
    backoff_s: float = 0.5  # before the 2nd read; doubled before each next one
    max_backoff_s: float = 8.0
    timeout_s: float = 120.0  # one read of one file (connect + body)


DEFAULT_RETRY = Retry()


def is_remote(location: str | os.PathLike) -> bool:
    text = os.fspath(location)
    return text.startswith(URL_SCHEMES) or text.startswith(PIPE)


def join(location: str | os.PathLike, name: str) -> str:
    """The file ``name`` inside the directory ``location``."""
    text = os.fspath(location)
    if text.startswith(PIPE):
        return text.replace("{name}", name) if "{name}" in text else f"{text}/{name}"
    if text.startswith(URL_SCHEMES):
        return f"{text.rstrip('/')}/{name}"
    return os.path.join(text, name)


def shown(location: str) -> str:
    """``location`` for a message: a URL without any user:password part."""
    if not location.startswith(URL_SCHEMES):
        return location
    parts = urlsplit(location)
    if parts.username is None and parts.password is None:
        return location
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _storage_options(url: str, timeout_s: float) -> dict:
    if url.startswith(("http://", "https://")):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout_s)}}
    if url.startswith("s3://"):
        # botocore's own retries off: ours count and back off the same way for every scheme. The endpoint is
        # botocore's own variable, read here too so that fsspec's cache of filesystems keys on it.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        config = {
            "connect_timeout": timeout_s,
            "read_timeout": timeout_s,
            "retries": {"total_max_attempts": 1},
        }
        return {"config_kwargs": config, **({"endpoint_url": endpoint} if endpoint else {})}
    return {}


def _read_once(location: str, timeout_s: float) -> bytes:
    if location.startswith(PIPE):
        from webdataset.gopen import gopen

        stream = gopen(location, "rb")
        try:
            data = stream.read()
        finally:
            stream.close()  # raises IOError when the command exited non-zero
        return data
    if location.startswith(URL_SCHEMES):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location, **_storage_options(location, timeout_s))
        if location.startswith("s3://"):
            # s3fs retries 5 times on its own (a class attribute, not an option): once here, so attempts,
            # backoff and the retry warnings are ours and 5 attempts mean 5, not 25.
            fs.retries = 1
        return fs.cat_file(path)
    with open(location, "rb") as f:
        return f.read()


def release_clients() -> None:
    """Close every remote-filesystem client this process holds. Call it before forking processes that
    read (the training loader does, before it starts data workers). fsspec's async clients (s3fs, gcsfs,
    HTTP) are not fork-safe: a child that inherits a live client tears it down through the parent's
    event loop, whose epoll set it shares, and the parent's next read on those sockets then waits for
    its whole read timeout (seen: 120 s stalls). Closed here, in the process that owns them, they leave
    nothing live to inherit; the next read opens a new client."""
    if "fsspec" not in sys.modules:
        return
    from fsspec.asyn import AsyncFileSystem

    classes, seen = [AsyncFileSystem], set()
    while classes:
        cls = classes.pop()
        if cls not in seen:
            seen.add(cls)
            cls.clear_instance_cache()
            classes.extend(cls.__subclasses__())
    gc.collect()  # runs the clients' finalizers now, which close their sessions on the owning loop


def read_bytes(location: str, *, size: int | None = None, retry: Retry = DEFAULT_RETRY) -> bytes:
    """The whole file at ``location``. ``size``: the expected length (a shorter read is retried as a
    dropped connection). Raises FileNotFoundError for a missing file (at once), DataError when every
    attempt failed."""
    local = not is_remote(location)
    last: Exception | None = None
    for attempt in range(1 if local else retry.attempts):
        if attempt:
            wait = min(retry.max_backoff_s, retry.backoff_s * 2 ** (attempt - 1))
            log.warning(
                "%s: attempt %d of %d failed (%s); retrying in %.2g s",
                shown(location),
                attempt,
                retry.attempts,
                _one_line(last),
                wait,
            )
            time.sleep(wait)
        try:
            data = _read_once(location, retry.timeout_s)
        except (FileNotFoundError, IsADirectoryError):
            raise
        except PermissionError as e:
            raise DataError(
                f"{shown(location)}: access denied ({e}); check the credentials the storage library reads "
                "(environment or profile)"
            ) from None
        except Exception as e:  # noqa: BLE001 - transport errors of every library: aiohttp, botocore, OSError
            if local:
                raise
            last = e
            continue
        if size is None or len(data) == size or local:
            return data
        last = OSError(f"short read: {len(data)} of {size} bytes")
    raise DataError(
        f"{shown(location)}: unreadable after {retry.attempts} attempts ({_one_line(last)}); check the URL, "
        "the network and the credentials (data.read_retries sets the attempts)"
    )


def _one_line(error: Exception | None) -> str:
    text = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}: {text}"
