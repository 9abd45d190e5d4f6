"""Paths from manifests and stores are data from a stranger: relative, and inside the root they name. A store records
the size (and sha256) of each video file, which training and verify compare before they decode it again."""

from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path

from .errors import UserError


def resolve_under(root: str | os.PathLike, relative: str, what: str) -> Path:
    """`root / relative`, refusing a path that is empty, absolute or climbs out of `root` with "..".

    Lexical, not through symlinks: links inside the user's own video root are theirs to make. `what` names
    where the path came from ("manifest train.csv line 3"), for the one-line error."""
    text = str(relative)
    normal = posixpath.normpath(text.replace("\\", "/")) if text else ""
    if (not text or "\x00" in text or text.startswith(("/", "\\")) or os.path.isabs(text)
            or (len(text) > 1 and text[1] == ":") or normal == ".." or normal.startswith("../")):
        raise UserError(f"{what}: video path {text!r} is not a relative path inside the video root; "
                        f"list videos relative to the root (no leading '/', no '..')")
    return Path(root) / normal


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_facts(path: str | os.PathLike, with_hash: bool) -> dict:
    """What a store records of a video file: size_bytes, and sha256 when asked."""
    facts: dict = {"size_bytes": os.path.getsize(path)}
    if with_hash:
        facts["sha256"] = file_sha256(path)
    return facts


def file_mismatch(path: str | os.PathLike, expected: dict) -> str | None:
    """Why the file at `path` is not the one recorded (`expected`: size_bytes, sha256 when recorded), or None."""
    size = expected.get("size_bytes")
    if size is not None and os.path.getsize(path) != size:
        return f"it is {os.path.getsize(path)} bytes, the store recorded {size}"
    sha = expected.get("sha256")
    if sha and file_sha256(path) != sha:
        return "its sha256 differs from the one the store recorded"
    return None
