"""The exceptions shared across the project.

Every error a user can fix (bad flag, missing file, mismatched store) is raised as a `UserError`
whose message names the problem and the fix; the CLI prints it as one line and exits 2. A `DecodeError`
is one video's failure. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line: what is wrong, then how to fix it."""


class DecodeError(RuntimeError):
    """One video cannot be decoded; a one-line message that starts with its path. Not a UserError: the
    extractor records it for that video and goes on. (Here, not in `decoders`, so that the decode pool's
    workers can know it without importing numpy before they have set their thread limits.)"""


def first_line(err: BaseException, limit: int = 200) -> str:
    """An exception's first line (its type name if it says nothing), cut to `limit` characters: the part of
    a library's error that fits inside a one-line message about it."""
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:limit]
