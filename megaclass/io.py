"""Atomic file output: readers never see a half-written file, and a killed writer leaves the old one.

Everything megaclass writes (tables, caches, checkpoints, plots, benchmark results) goes through here,
and every command checks its outputs with `check_writable` before it starts the work.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in `path`'s folder; on success it is renamed over `path`, on error removed.
    Unique temp names, so concurrent writers of the same file never collide."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_writable(path: str | os.PathLike, what: str, folder: bool = False) -> Path:
    """Raise OSError naming `what` and `path` unless `path` (a file, or with `folder` a folder) could be
    written now: a file path must not be a folder, and the nearest folder that exists on the way to it
    must be a folder in which a file can be created (probed with a temp file that is removed at once;
    nothing else is created). Call it before the work, so a long run cannot fail at its last step."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise IsADirectoryError(f"{what} {path}: is a folder; give a file path")
    if path.exists() and folder and not path.is_dir():
        raise NotADirectoryError(f"{what} {path}: exists and is not a folder")
    probe = path if folder else path.parent
    while not probe.exists() and probe != probe.parent:  # where os.makedirs would start creating
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{what} {path}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise PermissionError(f"{what} {path}: cannot create files in {probe} ({exc.strerror})") from None
    return path
