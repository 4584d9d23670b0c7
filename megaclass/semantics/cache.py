"""A content-addressed cache of embeddings and neighbours.

Keys are SHA-256 digests of everything the cached value depends on (texts and encoder for
embeddings; embeddings key, wnids, k, alpha and the similarity version for neighbours), so a run
with the same inputs finds its files and any change misses instead of returning stale results.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from megaclass.io import atomic_write_bytes


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
