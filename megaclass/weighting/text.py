"""Text features of keyword lists: one encoder call per unique keyword, then IDF-weighted bags.

An image's feature is the IDF-weighted mean of its keywords' MiniLM embeddings, L2-normalized. Web
titles are nearly all distinct, so encoding whole strings would cost one BERT pass per image (about
2 hours for 1M images on 2 cores); keywords repeat (Heaps' law: the vocabulary of 1M web titles is a
few hundred thousand words), so encoding each once and pooling is what makes 1M images fit in minutes.
IDF weighting lets rare, specific words (`whooping`, `marsh`) outweigh ones every category shares.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch


class KeywordEmbeddings:
    """Embeddings of single keywords, each encoded once per process (`cache`: keyword -> row)."""

    def __init__(self, encoder=None, batch_size: int = 512):
        if encoder is None:
            from megaclass.semantics.encoder import TextEncoder

            encoder = TextEncoder(batch_size=batch_size, max_length=16)
        self.encoder = encoder
        self.cache: dict[str, int] = {}
        self._rows: list[np.ndarray] = []
        self._table: torch.Tensor | None = None

    def add(self, keywords: Iterable[str], progress: bool = False) -> None:
        new = sorted({k for k in keywords if k not in self.cache})
        if not new:
            return
        vectors = self.encoder.encode(new, progress=progress)
        for k in new:
            self.cache[k] = len(self.cache)
        self._rows.append(np.asarray(vectors, dtype=np.float32))
        self._table = None

    @property
    def table(self) -> torch.Tensor:
        """float32 [vocabulary, D], rows in `cache` order."""
        if self._table is None:
            self._table = torch.from_numpy(np.concatenate(self._rows)) if self._rows else torch.zeros(0, 1)
        return self._table

    def bags(self, keyword_lists: Sequence[Sequence[str]], idf: dict[str, float] | None = None,
             default_idf: float = 1.0, chunk: int = 100_000) -> np.ndarray:
        """[N, D] L2-normalized IDF-weighted mean embedding per list; all-zero rows for empty lists."""
        self.add(k for ks in keyword_lists for k in ks)
        table = self.table
        out = np.zeros((len(keyword_lists), table.shape[1]), dtype=np.float32)
        for lo in range(0, len(keyword_lists), chunk):
            part = keyword_lists[lo:lo + chunk]
            flat = [k for ks in part for k in ks]
            if not flat:
                continue
            index = torch.tensor([self.cache[k] for k in flat], dtype=torch.long)
            offsets = torch.tensor(np.concatenate([[0], np.cumsum([len(ks) for ks in part])[:-1]]), dtype=torch.long)
            weights = torch.tensor([idf.get(k, default_idf) if idf else 1.0 for k in flat], dtype=torch.float32)
            pooled = torch.nn.functional.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights)
            out[lo:lo + len(part)] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out


def select_vocabulary(keyword_lists: Sequence[Sequence[str]], min_df: int = 1,
                      max_vocabulary: int | None = None) -> set[str]:
    """Keywords found on at least `min_df` images, at most `max_vocabulary` of them (the most
    frequent; ties broken alphabetically, so the choice is deterministic)."""
    df = Counter(k for ks in keyword_lists for k in set(ks))
    keep = [k for k, n in df.items() if n >= min_df]
    if max_vocabulary is not None and len(keep) > max_vocabulary:
        keep = sorted(keep, key=lambda k: (-df[k], k))[:max_vocabulary]
    return set(keep)


def inverse_document_frequency(keyword_lists: Sequence[Sequence[str]]) -> tuple[dict[str, float], float]:
    """Smoothed IDF `log((1 + N) / (1 + df)) + 1` per keyword, and the value for an unseen keyword."""
    df = Counter(k for ks in keyword_lists for k in set(ks))
    n = len(keyword_lists)
    return {k: math.log((1 + n) / (1 + d)) + 1 for k, d in df.items()}, math.log(1 + n) + 1
