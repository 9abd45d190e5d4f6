"""Errors raised by the feature store.

User-fixable problems (wrong path, a store made with other flags) are `UserError`s, which the CLI
prints as one line. Asking for a sample that was never extracted is a caller bug, not a user error.
"""

from dist_cache.errors import UserError


class StoreMismatchError(UserError):
    """An existing store was made with a different compat schema or video list; nothing was written."""


class StoreNotFoundError(UserError):
    """No dist-cache store at the given location (or something else is there)."""


class SampleNotDoneError(LookupError):
    """A sample's video has no "done" record, so its zarr chunks hold zeros or stale bytes, not features."""
