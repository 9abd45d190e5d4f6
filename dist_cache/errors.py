"""The one exception type the CLI turns into a one-line message and a non-zero exit.

Every error a user can fix (bad flag, missing file, mismatched store) is raised as a `UserError`
whose message names the problem and the fix. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line: what is wrong, then how to fix it."""
