"""Identifiers taken from messages, made safe by construction before they become file names or topic levels.

Every identifier a peer controls and the device turns into a path or an MQTT topic goes through `check_name`:
transfer ids (`<store>/transfers/<t>/`, `.../model/push/<t>/ack`), bundle versions (`versions/<version>-<sha>/`),
archive member names (each path component), command names (`.../cmd/<name>/result`). A name is 1 to 64 characters
of ASCII letters, digits, '.', '_' and '-', starting with a letter or a digit: so never empty, never '.' or '..',
never hidden, never an option-like '-x', and free of NUL, '/', '\\', MQTT wildcards ('+', '#') and anything a
terminal or a log would render misleadingly.

`inside(root, path)` is the second line of defence: a path built from validated names is resolved and must still
lie strictly inside its root (no symlink anywhere on the way points out) before anything is created or deleted.
`shown(value)` renders hostile input for an error message: repr-escaped and cut to a bounded length.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from edgecv.agent.errors import UnsafeNameError

MAX_NAME = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*")
SHOWN_CHARS = 48  # how much of a refused value an error message repeats


def is_name(value: object, max_len: int = MAX_NAME) -> bool:
    return isinstance(value, str) and 0 < len(value) <= max_len and _NAME.fullmatch(value) is not None


def check_name(value: object, what: str, max_len: int = MAX_NAME) -> str:
    """Return `value` if it is a safe name, else raise UnsafeNameError saying what was wrong."""
    if is_name(value, max_len):
        return value  # type: ignore[return-value]
    if not isinstance(value, str):
        raise UnsafeNameError(f"{what} must be a string, got {type(value).__name__}")
    raise UnsafeNameError(f"{what} {shown(value)} is not a safe name: use 1 to {max_len} ASCII letters, digits, "
                          "'.', '_' or '-', starting with a letter or digit")


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`value` for an error message: repr (so control characters and NUL are escaped), at most `limit` chars."""
    text = repr(value) if isinstance(value, str) else f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return text


def inside(root: Path, path: Path) -> Path:
    """`path` resolved, after checking it lies strictly inside `root` (also resolved); raise UnsafeNameError if not.

    Resolving follows symlinks, so a link planted anywhere on the way that points elsewhere is caught too.
    """
    base = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real == base or base not in real.parents:
        raise UnsafeNameError(f"Refusing to touch {path}: it resolves to {real}, outside {base}")
    return real


def join(root: Path, *names: str, what: str = "Name") -> Path:
    """`root / names...` for validated names, checked to stay inside `root`."""
    path = Path(root)
    for name in names:
        path = path / check_name(name, what)
    return inside(root, path)
