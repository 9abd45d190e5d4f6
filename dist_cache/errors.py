"""The one exception type the CLI turns into a one-line message and a non-zero exit.

Every error a user can fix (bad flag, missing file, mismatched store) is raised as a `UserError`
whose message names the problem and the fix. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line: what is wrong, then how to fix it."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """An exception's first line (its type name if it says nothing), cut to `limit` characters: the part of
    a library's error that fits inside a one-line message about it."""
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:limit]
