"""The exceptions shared across the project.

Every error a user can fix (bad flag, missing file, mismatched store) is raised as a `UserError`
whose message names the problem and the fix; the CLI prints it as one line and exits 2. A `DecodeError`
is one video's failure; a `MachineError` (or what `machine_failure` recognises) is the machine's, never a video's.
Anything else is a bug and keeps its traceback.
"""

import errno


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


class MachineError(UserError):
    """The machine failed, not the input: decode workers that keep dying, memory or file handles exhausted, a
    file system gone. Never recorded as a video's failure: the run stops with one line saying what to check,
    and the same command, rerun, resumes. (A `UserError`, like a full disk: the CLI prints it and exits 2.)"""


# errnos that say the machine failed, whatever file it was reading: memory, file handles, quotas, a disk or a
# network file system gone. ENOENT, EACCES and the like concern the one file, and stay that video's failure.
MACHINE_ERRNOS = frozenset({
    errno.ENOMEM, errno.ENOBUFS, errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.EIO, errno.ESTALE,
    errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH,
})


def machine_failure(err: BaseException) -> bool:
    """Whether `err`, raised while preparing one video, is the machine's failure rather than the video's."""
    return (isinstance(err, (MachineError, MemoryError))
            or (isinstance(err, OSError) and err.errno in MACHINE_ERRNOS))


def machine_error(subject: str, err: BaseException) -> MachineError:
    """The one line for a machine failure met while working on `subject` (a video's path)."""
    if isinstance(err, MachineError):
        return err
    if isinstance(err, MemoryError):
        what, check = "out of memory", "free memory or lower --decode-workers"
    else:
        what, check = f"{errno.errorcode.get(err.errno, err.errno)} ({err.strerror})", "check the machine"
    return MachineError(f"{what} while preparing {subject} ({type(err).__name__}: {first_line(err)}): the machine, "
                        f"not the video; {check} and rerun the same command (it resumes; nothing was recorded as "
                        "failed for this)")
