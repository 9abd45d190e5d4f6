"""Errors raised by the feature store.

User-fixable problems (wrong path, a store made with other flags, a damaged file, a full disk) are
`UserError`s, which the CLI prints as one line. Asking for a sample that was never extracted is a caller
bug, not a user error.
"""

import errno
import sys

from dist_cache.errors import UserError, first_line

# The fix for a damaged video, named in every damage message. `extract --repair` re-extracts the videos
# whose data fails its integrity check (storage/README.md, "Damage detection").
REPAIR_HINT = "rerun the extract command with --repair"


def store_fix(format_version: int, videos_per_shard: int) -> str:
    """The fix for damage to a store as a whole (a table, a metadata document), by what can rewrite it: extract
    --repair for a store extract writes, a new copy for a packed copy (read-only), a backup for format 1 (never
    written into)."""
    if format_version < 2:
        return "format 1 stores are never written into: restore it from a backup, or re-extract into a new --out"
    if videos_per_shard > 1:
        return ("this packed copy is read-only: copy it again from its source into a new destination (dist-cache "
                f"copy SRC NEW_DST --videos-per-shard {videos_per_shard}; a copy into this one skips what it holds)")
    return REPAIR_HINT


class StoreMismatchError(UserError):
    """An existing store was made with a different compat schema or video list; nothing was written."""


class StoreNotFoundError(UserError):
    """No dist-cache store at the given location (or something else is there)."""


class StoreDamagedError(UserError):
    """Stored bytes are missing or fail their checksum; never returned as data."""


class MissingChunkError(StoreDamagedError):
    """A chunk a store must hold is absent (never read as zarr's fill value); `key` names it."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


class StoreWriteError(UserError):
    """Writing the store failed (disk full, read-only, I/O error, remote 5xx); the store stays resumable."""


class SampleNotDoneError(LookupError):
    """A sample's video has no "done" record, so its zarr chunks hold zeros or stale bytes, not features."""


def write_error(store: str, err: BaseException) -> StoreWriteError | None:
    """One line for a storage failure while writing a store: what happened and what to do (then rerun, which
    resumes: nothing recorded is lost). None for an error that is not the storage's (a bug, a bad argument)."""
    if isinstance(err, OSError):
        return _os_write_error(store, err)
    if isinstance(err, _transport_errors()):
        return StoreWriteError(f"cannot write store {store}: {first_line(err).rstrip('.')}; check its endpoint and the "
                               f"network, then rerun")
    return None


def _os_write_error(store: str, err: OSError) -> StoreWriteError:
    code = err.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return StoreWriteError(f"disk full writing {store}: free space and rerun")
    if code == errno.EROFS:
        return StoreWriteError(f"{store} is on a read-only file system: make it writable or use another --out, "
                               f"then rerun")
    if code == errno.EFBIG:
        return StoreWriteError(f"file too large writing {store} (a file-size limit, ulimit -f, or the file "
                               f"system's): raise the limit and rerun")
    if code in (errno.EACCES, errno.EPERM):
        return StoreWriteError(f"permission denied writing {store}: fix the permissions or use another --out, "
                               f"then rerun")
    # s3fs turns a remote's 5xx (after retries) into an OSError carrying the server's message as strerror.
    reason = (err.strerror or first_line(err)).rstrip(".")
    return StoreWriteError(f"cannot write store {store}: {reason}; check the storage and rerun")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """A remote's connection failures that are not OSErrors: botocore's refused, closed and timed-out
    connections, which s3fs passes through untranslated, and aiohttp's, from HTTP-based fsspec filesystems.
    Looked up only where a remote filesystem already imported them, so local stores never import either."""
    found: tuple[type[BaseException], ...] = ()
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None:
        # Not BotoCoreError as a whole: its credential and parameter errors are the user's setup, not the remote's.
        found += (botocore.ConnectionError, botocore.HTTPClientError)
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        found += (aiohttp.ClientError,)
    return found


def refused_access(url: str, err: BaseException) -> UserError | None:
    """One line when a store's server refused us (no or wrong credentials), None for any other error.

    s3fs turns S3's AccessDenied into PermissionError but lets botocore's NoCredentialsError through; botocore is
    looked up only where a remote filesystem already imported it."""
    refusals: tuple[type[BaseException], ...] = (PermissionError,)
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None:
        refusals += (botocore.NoCredentialsError,)
    if not isinstance(err, refusals):
        return None
    return UserError(f"store {url} refused access ({first_line(err)}): pass its credentials and endpoint with "
                     f"--storage-options (or the AWS environment) and rerun")
