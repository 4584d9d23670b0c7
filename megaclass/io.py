"""Durable atomic file output: readers never see a half-written file, and neither a killed writer nor a
node that loses power leaves anything but the old file or the whole new one.

Everything megaclass writes (tables, caches, checkpoints, plots, benchmark results) goes through here.
A rename alone survives a killed process, not a crash of the machine: the file system may commit the
rename before the data. So the new file is fsynced before the rename and its folder after it.
Every command checks its outputs with `check_writable` before it starts the work.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's contents (for a folder: its entries) to stable storage. A failure
    (EIO: the data never reached the disk) raises an OSError naming `path`."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        os.close(fd)


def torch_save(obj, path: str | Path, zipfile_serialization: bool = True) -> None:
    """`torch.save(obj, path)` through a Python file: a failed write raises the OSError itself naming
    `path` ("[Errno 28] No space left on device: '…'"), where torch's own file writer would raise an
    `inline_container.cc` RuntimeError that names neither the file nor the cause."""
    import torch

    try:
        with open(path, "wb") as f:
            torch.save(obj, f, _use_new_zipfile_serialization=zipfile_serialization)
    except OSError as exc:  # from a write, or from the close that flushes the rest
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in `path`'s folder; on success it is fsynced, renamed over `path` and the
    folder fsynced; on error removed. Unique temp names, so concurrent writers of the same file never
    collide."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except OSError as exc:  # named by the file it was to become: the temp file is gone
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def replace_folder(src: str | Path, dst: str | Path) -> None:
    """Rename the finished folder `src` to `dst` durably: every file and folder below `src` is
    fsynced first (what other libraries wrote there, e.g. DeepSpeed's checkpoint files, included),
    then the rename, then `dst`'s parent folder."""
    for folder, _, files in os.walk(src):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)
    os.replace(src, dst)
    fsync_path(os.path.dirname(os.path.abspath(dst)))


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
