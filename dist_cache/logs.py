"""Quietening one known, expected log message of a library, and nothing else."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def without_log_message(start: str, logger: str = "") -> Iterator[None]:
    """Drop the records of `logger` (the root logger by default) whose message starts with `start`, for the
    block's duration; every other record, warnings about the model included, still reaches the handlers.

    Why not raise the logger's level: that would hide every other warning logged meanwhile. The filter is
    removed on exit, so the logger is left exactly as it was.
    """

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith(start)

    target = logging.getLogger(logger)
    drop = _Drop()
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)
