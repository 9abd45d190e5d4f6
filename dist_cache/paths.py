"""Paths from manifests and stores are data from a stranger: relative, and inside the root they name."""

from __future__ import annotations

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
