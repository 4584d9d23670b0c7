"""Atomic file writes and a content-addressed cache of embeddings and neighbours.

Keys are SHA-256 digests of everything the cached value depends on (texts and encoder for
embeddings; embeddings key, wnids, k, alpha and the similarity version for neighbours), so a run
with the same inputs finds its files and any change misses instead of returning stale results.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename over `path` (readers never see half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def digest(*parts) -> str:
    """A short stable hex key over JSON-serializable parts."""
    blob = json.dumps(parts, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:24]


class ArrayCache:
    """`.npz` files named `<kind>-<key>.npz` in one folder; `None` as folder disables caching."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder is not None else None

    def path(self, kind: str, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{kind}-{key}.npz"

    def load(self, kind: str, key: str) -> dict[str, np.ndarray] | None:
        path = self.path(kind, key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {name: data[name] for name in data.files}
        except (OSError, ValueError):  # a damaged entry is recomputed, then overwritten
            return None

    def save(self, kind: str, key: str, **arrays: np.ndarray) -> None:
        path = self.path(kind, key)
        if path is not None:
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            atomic_write_bytes(path, buffer.getvalue())
