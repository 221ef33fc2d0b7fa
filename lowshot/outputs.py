"""Files written for people (results, reports, plots, baselines): checked before any work starts, then written
atomically, so a bad ``--output`` fails in a second rather than after a long run, and a reader never sees half a
file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .cache import write_atomic
from .errors import BadInputError

RESULT_SUFFIXES = {".json": "json", ".csv": "csv", ".md": "markdown"}  # lowshot probe --output
REPORT_SUFFIXES = {".md": "markdown", ".csv": "csv", ".json": "json"}  # lowshot report --output


def output_format(path: str | Path, suffixes: dict[str, str], *, flag: str = "--output") -> str:
    """The format that ``path``'s extension names, or an error listing the ones that are understood."""
    suffix = Path(path).suffix.lower()
    if suffix not in suffixes:
        raise BadInputError(f"{flag} {path}: unknown extension {suffix or '(none)'!r}; use one of "
                            f"{', '.join(suffixes)}")
    return suffixes[suffix]


def check_writable(path: str | Path, *, flag: str = "--output") -> Path:
    """Fail now if ``path`` cannot be written later: it is a folder, or its nearest existing parent is not a
    writable folder (missing folders below that one are created when the file is saved)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise BadInputError(f"{flag} {path}: is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise BadInputError(f"{flag} {path}: cannot write (permission denied)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BadInputError(f"{flag} {path}: cannot write ({parent} is not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"{flag} {path}: cannot write ({parent} is not writable)")
    return path


def save_text(path: str | Path, text: str, *, flag: str = "--output") -> Path:
    """Write ``text`` to ``path`` atomically (creating missing parent folders)."""
    return save_with(path, "w", lambda handle: handle.write(text), flag=flag)


def save_with(path: str | Path, mode: str, write: Callable[[IO], object], *, flag: str = "--output") -> Path:
    """Write ``path`` atomically through ``write(handle)``: one error message for any path that cannot be written."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, mode, write)
    except OSError as exc:
        raise BadInputError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from None
    return path
