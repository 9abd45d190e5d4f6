"""Quietening one known, expected log message of a library, and nothing else; dist-cache's own warnings on lines of
their own while a progress bar is drawn."""

from __future__ import annotations

import contextlib
import logging
import sys
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


class BarSafeHandler(logging.Handler):
    """Writes each record's message to stderr on a line of its own, above any progress bar drawn there: tqdm.write
    lifts the bar, writes the line and draws the bar again. Logging's last-resort handler, which printed dist-cache's
    own warnings before (storage's HTTP retries and whole-object reads), wrote them into the bar's line, on the
    terminal and in RUN/train.log alike."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)  # the last-resort handler's level and format (the message alone)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)  # sys.stderr now: RunLog may have replaced it
        except Exception:  # noqa: BLE001 - logging's contract: a failing handler reports, never raises
            self.handleError(record)


def warnings_above_bars(logger: str = "storage") -> None:
    """Route `logger`'s warnings through BarSafeHandler (once). Its records still propagate, so a handler the
    application or pytest puts on the root logger sees them too; with none there, this is the only one printing."""
    target = logging.getLogger(logger)
    if not any(isinstance(h, BarSafeHandler) for h in target.handlers):
        target.addHandler(BarSafeHandler())
