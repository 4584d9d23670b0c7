"""Confinement to the data root: a path named by a data file never reaches outside the root.

The rule is the one of Python's `tarfile` "data" filter: a member path must be relative, must not
climb (`..`), and must still lie inside the root once every symbolic link is resolved. Data files
come from the web; `../../etc/passwd 0` in a filelist must not be read (or trained on).
"""
from __future__ import annotations

import os
from pathlib import Path


def plain_relative(path: str) -> bool:
    """True for a relative POSIX path whose components are all names: no leading '/', no empty, '.'
    or '..' component, no NUL byte. (One spelling per file, so duplicates are found by comparison.)"""
    if not path or "\x00" in path or path.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def real_root(root: str | os.PathLike) -> str:
    """The root with every symbolic link resolved."""
    return os.path.realpath(root)


def inside(real: str, root: str) -> bool:
    """True when the resolved path `real` is `root` (resolved) or below it."""
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def resolve_inside(root: str | os.PathLike, relative: str, resolved_root: str | None = None) -> Path | None:
    """`root/relative` with links resolved, or None when `relative` is not a plain relative path or
    resolves outside the root. Nothing is opened; only links along the path are read."""
    if not plain_relative(relative):
        return None
    base = resolved_root or real_root(root)
    real = os.path.realpath(os.path.join(base, relative))
    return Path(real) if inside(real, base) else None
