"""Text features of keyword lists: one encoder call per unique keyword, then IDF-weighted bags.

An image's feature is the IDF-weighted mean of its keywords' MiniLM embeddings, L2-normalized. Web
titles are nearly all distinct, so encoding whole strings would cost one BERT pass per image (about
2 hours for 1M images on 2 cores); keywords repeat (Heaps' law: the vocabulary of 1M web titles is a
few hundred thousand words), so encoding each once and pooling is what makes 1M images fit in minutes.
IDF weighting lets rare, specific words (`whooping`, `marsh`) outweigh ones every category shares.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(slots=True)
class KeywordBags:
    """The keyword lists of N images as columns (CSR): image i's keywords are
    `words[ids[offsets[i]:offsets[i + 1]]]`, each at most once per image, in order of appearance.
    words: the vocabulary [V]; ids: int32 [total]; offsets: int64 [N + 1]."""

    words: list[str]
    ids: np.ndarray
    offsets: np.ndarray

    @classmethod
    def of(cls, lists: KeywordBags | Sequence[Sequence[str]]) -> KeywordBags:
        """Bags from lists of keywords (a keyword repeated within a list is kept once)."""
        if isinstance(lists, KeywordBags):
            return lists
        index: dict[str, int] = {}
        ids, lengths = [], []
        for ks in lists:
            row = list(dict.fromkeys(index.setdefault(k, len(index)) for k in ks))
            ids.extend(row)
            lengths.append(len(row))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(list(index), np.array(ids, dtype=np.int32), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[str]:
        return [self.words[k] for k in self.ids[self.offsets[i]:self.offsets[i + 1]].tolist()]

    def tolist(self) -> list[list[str]]:
        return [self[i] for i in range(len(self))]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document_frequency(self) -> np.ndarray:
        """int64 [V]: on how many images each word is."""
        return np.bincount(self.ids, minlength=len(self.words))

    def keep(self, word_mask: np.ndarray) -> KeywordBags:
        """Only the words where `word_mask` [V] is true (the vocabulary stays, ids keep their meaning)."""
        # kept per image by a sum over each bag's bools, not a cumulative int64 count of every keyword
        # (8 bytes a keyword: ~150 bytes an image beside bags of ~80)
        kept = np.append(word_mask[self.ids], False)  # one more: every bag's start is an index, also at the end
        starts = self.offsets[:-1]
        counts = np.add.reduceat(kept, starts, dtype=np.int64) if len(starts) else np.zeros(0, dtype=np.int64)
        counts[self.lengths() == 0] = 0  # reduceat gives the element at the start of an empty range
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return KeywordBags(self.words, self.ids[kept[:-1]], offsets)


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

    def pooler(self, keyword_lists: KeywordBags | Sequence[Sequence[str]], idf: dict[str, float] | None = None,
               default_idf: float = 1.0):
        """`pool(lo, hi) -> [hi - lo, D]`: the L2-normalized IDF-weighted mean embedding of the lists
        lo..hi-1 (all-zero rows for empty lists), so that N rows need never exist at once. Every
        keyword of the lists is encoded here, once."""
        bags = KeywordBags.of(keyword_lists)
        used = np.zeros(len(bags.words), dtype=bool)
        used[bags.ids] = True
        self.add(w for w, u in zip(bags.words, used.tolist()) if u)
        row = np.array([self.cache.get(w, -1) for w in bags.words], dtype=np.int64)  # word id -> table row
        weight = np.array([idf.get(w, default_idf) for w in bags.words] if idf else np.ones(len(bags.words)),
                          dtype=np.float32)
        table = self.table

        def pool(lo: int, hi: int) -> np.ndarray:
            out = np.zeros((hi - lo, table.shape[1]), dtype=np.float32)
            a, b = bags.offsets[lo], bags.offsets[hi]
            if a < b:
                ids = bags.ids[a:b]
                pooled = torch.nn.functional.embedding_bag(
                    torch.from_numpy(row[ids]), table, torch.from_numpy(bags.offsets[lo:hi] - a), mode="sum",
                    per_sample_weights=torch.from_numpy(weight[ids]))
                out[:] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
            return out

        return pool

    def bags(self, keyword_lists: KeywordBags | Sequence[Sequence[str]], idf: dict[str, float] | None = None,
             default_idf: float = 1.0, chunk: int = 1 << 20) -> np.ndarray:
        """[N, D]: `pooler`'s vectors of all N lists."""
        bags = KeywordBags.of(keyword_lists)
        pool = self.pooler(bags, idf, default_idf)
        out = np.zeros((len(bags), self.table.shape[1]), dtype=np.float32)
        for lo in range(0, len(bags), chunk):
            out[lo:lo + chunk] = pool(lo, min(lo + chunk, len(bags)))
        return out


def vocabulary_mask(bags: KeywordBags, min_df: int = 1, max_vocabulary: int | None = None) -> np.ndarray:
    """bool [V]: the words found on at least `min_df` images, at most `max_vocabulary` of them (the
    most frequent; ties broken alphabetically, so the choice is deterministic)."""
    df = bags.document_frequency()
    keep = df >= max(min_df, 1)
    if max_vocabulary is not None and keep.sum() > max_vocabulary:
        candidates = np.flatnonzero(keep)
        order = sorted(candidates.tolist(), key=lambda k: (-df[k], bags.words[k]))[:max_vocabulary]
        keep = np.zeros(len(df), dtype=bool)
        keep[order] = True
    return keep


def select_vocabulary(keyword_lists: KeywordBags | Sequence[Sequence[str]], min_df: int = 1,
                      max_vocabulary: int | None = None) -> set[str]:
    """The words of `vocabulary_mask`, as a set."""
    bags = KeywordBags.of(keyword_lists)
    return {bags.words[k] for k in np.flatnonzero(vocabulary_mask(bags, min_df, max_vocabulary)).tolist()}


def inverse_document_frequency(keyword_lists: KeywordBags | Sequence[Sequence[str]]) -> tuple[dict[str, float], float]:
    """Smoothed IDF `log((1 + N) / (1 + df)) + 1` per keyword on at least one image, and the value for an
    unseen keyword."""
    bags = KeywordBags.of(keyword_lists)
    df = bags.document_frequency()
    n = len(bags)
    idf = np.log((1 + n) / (1 + df)) + 1
    return {bags.words[k]: float(idf[k]) for k in np.flatnonzero(df).tolist()}, float(np.log(1 + n) + 1)
