"""Atomic files and hashing: the one low utility module every stage may use.

A file lowshot writes is written through a temp file in its folder and renamed into place, so a reader (another run,
a crash, a Ctrl-C) sees the old file or the new one, never half of one. Files written for people (results, reports,
plots, baselines) are also checked before any work starts, so a bad ``--output`` fails in a second rather than
after a long run. The check is a real write: an empty temp file is created (and removed) in the folder the file will
go to, the way the atomic save will write it -- ``os.access`` says yes for ``/proc`` and ``/sys``, where nothing can
be created. When a save still fails at the end (the folder was removed or filled up during the run), the content is
written to a timestamped file in the current folder (else the temp folder) and the error names it: work is never
lost to an output path.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np

from lowshot.errors import BadInputError, OutputError


def digest(obj: object) -> str:
    """Stable sha256 of a JSON-able object (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _file_mode(path: Path) -> int:
    """The permissions a plain ``open(path, "w")`` would give: the existing file's, else 0o666 less the umask
    (``mkstemp`` makes its temp files 0o600, which would leave results unreadable to anyone else)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomic(path: Path, mode: str, write: Callable[[IO], None]) -> None:
    """Write through a temp file in the same folder, fsync, then rename: readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode(path))
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: object, *, indent: int | None = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "w", lambda handle: json.dump(obj, handle, indent=indent, sort_keys=True))


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    write_atomic(path, "wb", lambda handle: np.save(handle, array))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


RESULT_SUFFIXES = {".json": "json", ".csv": "csv", ".md": "markdown"}  # lowshot probe --output
REPORT_SUFFIXES = {".md": "markdown", ".csv": "csv", ".json": "json"}  # lowshot report --output


def output_format(path: str | Path, suffixes: dict[str, str], *, flag: str = "--output") -> str:
    """The format that ``path``'s extension names, or an error listing the ones that are understood."""
    path = Path(path)
    if path.expanduser().is_dir():
        raise BadInputError(f"{flag} {path}: is a folder; give a file name such as "
                            f"{path / ('results' + next(iter(suffixes)))}")
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise BadInputError(f"{flag} {path}: unknown extension {suffix or '(none)'!r}; use one of "
                            f"{', '.join(suffixes)}")
    return suffixes[suffix]


def check_writable(path: str | Path, *, flag: str = "--output") -> Path:
    """Fail now if ``path`` cannot be written later: it is a folder or not a regular file, a read-only file, or
    no file can be created in its nearest existing folder (missing folders below that one are created when the
    file is saved)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise BadInputError(f"{flag} {path}: is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise BadInputError(f"{flag} {path}: is not a regular file; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise BadInputError(f"{flag} {path}: cannot write (permission denied)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BadInputError(f"{flag} {path}: cannot write ({parent} is not a folder)")
    problem = _creation_problem(parent)
    if problem:
        raise BadInputError(f"{flag} {path}: {problem}")
    return path


def check_folder(folder: str | Path, *, flag: str = "--output") -> Path:
    """Create ``folder`` (with its parents) and make sure files can be created in it, before any work."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"{flag} {folder}: cannot create the folder ({exc.strerror or exc})") from None
    problem = _creation_problem(folder)
    if problem:
        raise BadInputError(f"{flag} {folder}: {problem}")
    return folder


def _creation_problem(folder: Path) -> str | None:
    """Why no file can be created in ``folder``, found by creating (and removing) an empty one; None if it can."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".lowshot-check-", suffix=".tmp")
    except OSError as exc:
        return f"cannot create a file in {folder}: {exc.strerror or exc}"
    os.close(fd)
    Path(probe).unlink(missing_ok=True)
    return None


def save_text(path: str | Path, text: str, *, flag: str = "--output") -> Path:
    """Write ``text`` to ``path`` atomically (creating missing parent folders)."""
    return save_with(path, "w", lambda handle: handle.write(text), flag=flag)


def save_with(path: str | Path, mode: str, write: Callable[[IO], object], *, flag: str = "--output") -> Path:
    """Write ``path`` atomically through ``write(handle)``. If it cannot be written, the same content goes to
    :func:`fallback_path` and :class:`OutputError` names both (one message for any path that fails)."""
    path = Path(path).expanduser()
    try:
        _write(path, mode, write)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        kept = _keep_elsewhere(path, mode, write)
        where = f"; its content was saved to {kept} instead" if kept else "; it could not be saved anywhere else"
        raise OutputError(f"{flag} {path}: cannot write ({reason}){where}") from None
    return path


def fallback_path(path: Path, folder: Path) -> Path:
    """``path``'s name with the time added (``results-20261206-231502.json``), in ``folder``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return folder / f"{path.stem}-{stamp}{path.suffix}"


def _keep_elsewhere(path: Path, mode: str, write: Callable[[IO], object]) -> Path | None:
    """Write the content to a timestamped file in the current folder, else the temp folder; None if both fail."""
    try:
        folders = [Path.cwd(), Path(tempfile.gettempdir())]
    except OSError:  # the current folder was removed
        folders = [Path(tempfile.gettempdir())]
    for folder in folders:
        target = fallback_path(path, folder)
        if target.resolve() == path.resolve():
            continue
        try:
            _write(target, mode, write)
        except OSError:
            continue
        return target
    return None


def _write(path: Path, mode: str, write: Callable[[IO], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, mode, write)
