"""RUN/train.log: what `train` printed, each line with the local time it was printed, as mmaction2 keeps a text log
beside its checkpoints. Every start appends to the same file (a `--resume` continues it), under a line saying so.

`RunLog` copies what goes through sys.stdout and sys.stderr (click's lines, warnings, tqdm's bar) and passes it on
unchanged. A progress bar redraws one line with carriage returns: the log keeps its last state when the line ends,
and a snapshot every `snapshot_s` seconds meanwhile, so a run of hours leaves a readable trail rather than
thousands of redraws. An error that ends the run is logged as the one line the user saw.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

# How often a bar that is still redrawing its line is written to the log.
SNAPSHOT_S = 60.0


class RunLog:
    """`with RunLog(path, "started"):` tees sys.stdout and sys.stderr into `path` (appended) until the block ends."""

    def __init__(self, path: str | Path, heading: str | None = None, snapshot_s: float = SNAPSHOT_S) -> None:
        self.path = Path(path)
        self.heading = heading
        self.snapshot_s = snapshot_s
        self._lock = threading.Lock()
        self._file: TextIO | None = None
        self._saved: tuple[Any, Any] | None = None

    def __enter__(self) -> RunLog:
        from dist_cache.errors import UserError

        try:
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as err:
            raise UserError(f"--out {self.path.parent}: cannot write {self.path.name} ({err.strerror or err}); make "
                            "the run directory writable, or use another --out") from None
        if self.heading:
            self.line(f"=== {self.heading}")
        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        out, error = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self._saved
        for tee in (out, error):
            if isinstance(tee, _Tee):
                tee.end()
        if err is not None:
            from dist_cache.errors import UserError, first_line
            from pipelines.train.preemption import Preempted

            if isinstance(err, KeyboardInterrupt):
                self.line("interrupted")
            elif isinstance(err, Preempted):  # the line the user saw: a stop asked for, not an error
                self.line(f"preempted: {err}")
            elif isinstance(err, UserError):
                self.line(f"error: {err}")
            elif not isinstance(err, SystemExit):
                self.line(f"error: {type(err).__name__}: {first_line(err, 300)}")
        if self._file is not None:
            self._file.close()

    def line(self, text: str) -> None:
        """Write one line, stamped with the time."""
        with self._lock:
            if self._file is None or self._file.closed:
                return
            try:
                self._file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text.rstrip()}\n")
                self._file.flush()
            except OSError:
                # A full disk: the log stops, the run does not (its checkpoint writes report the disk in one line).
                file, self._file = self._file, None
                with contextlib.suppress(OSError):
                    file.close()


class _Tee:
    """A text stream that writes through to `stream` and gives `log` each finished line."""

    def __init__(self, stream: Any, log: RunLog) -> None:
        self._stream = stream
        self._log = log
        self._pending = ""  # the line being written; after a carriage return, only what follows it
        self._snapshot = time.monotonic()
        self._snapshotted: str | None = None  # the unfinished line last logged, not to be logged twice

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        *done, self._pending = (self._pending + text).split("\n")
        for line in done:
            self._emit(line)
        if "\r" in self._pending:
            self._pending = self._pending.rsplit("\r", 1)[1]
            if self._pending.strip() and time.monotonic() - self._snapshot >= self._log.snapshot_s:
                self._emit(self._pending)
                self._snapshotted = self._pending
        return written

    def _emit(self, line: str) -> None:
        line = line.rsplit("\r", 1)[-1]
        if line.strip() and line != self._snapshotted:
            self._log.line(line)
            self._snapshot = time.monotonic()
        self._snapshotted = None

    def end(self) -> None:
        """The last, unfinished line (a bar never closed) goes to the log too."""
        self._emit(self._pending)
        self._pending = ""

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding...: the real stream's
        return getattr(self._stream, name)


def run_heading(resume: bool) -> str:
    """The line each start of a run writes first: which start it is."""
    return "dist-cache train: resumed (--resume)" if resume else "dist-cache train: started"
