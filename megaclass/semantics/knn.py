"""K nearest categories: WordNet (Wu-Palmer) similarity updated with BERT cosine, top-k blockwise.

    score(a, b) = alpha · wup(a, b) + (1 - alpha) · cos(e_a, e_b)

e_x: the L2-normalized MiniLM embedding of class x's text (lemmas, gloss, hypernyms). Both terms are
symmetric and lie in [0, 1] (wup) or [-1, 1] (cos, in practice ~[0, 1]); see docs/semantics.md for why
alpha = 0.5 is the default. Neighbours are found a block of rows × a block of columns at a time, upper
triangle only (the score is symmetric, so each block serves its rows and, through the entries above
the columns' current k-th best, its columns): memory is O(block²) plus the [C, K] answer, never C × C.

Neighbours by meaning, not by a shared word: two classes that share a name — a lemma of one is a
lemma of the other, or a word of one of its multi-word lemmas (crane the bird / crane the machine;
bow the weapon / bow tie) — have close texts because of that word alone. Such a pair is never a
neighbour unless WordNet relates the two senses: wup ≥ 1/2, i.e. their deepest common hypernym lies
at least halfway down their root paths (lesser panda / giant panda, 0.93; crane / crane, 0.36).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from megaclass.io import atomic_write_text
from megaclass.semantics.cache import ArrayCache, digest
from megaclass.semantics.encoder import TextEncoder
from megaclass.semantics.hierarchy import WuPalmer
from megaclass.semantics.synsets import WNID, check_noun_synsets, class_texts, lemma_names
from megaclass.semantics.wordnet import synset_of

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.5
DEFAULT_BLOCK = 2048
RELATED_WUP = 0.5
"""senses sharing a name are neighbours only at or above this Wu-Palmer similarity (module docstring)"""
# Bump when the text recipe or similarity changes, so cached neighbours of older code are not reused.
SIMILARITY_VERSION = 2

ScoreBlock = Callable[[slice, slice], torch.Tensor]


class KnnFileError(ValueError):
    """A knn.tsv file is malformed; the message names the file and line."""


def _check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


def topk_blockwise(score_block: ScoreBlock, n: int, k: int, block_size: int = DEFAULT_BLOCK,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best columns of every row of a SYMMETRIC n × n score matrix, the diagonal excluded.

    score_block(rows, cols) -> float32 [len(rows), len(cols)] gives one block; only blocks with
    cols.start >= rows.start are requested. Returns (indices int64 [n, k], scores float32 [n, k]),
    best first, equal scores by lower index (which of several classes tied at the k-th place is kept
    is not specified).
    """
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} classes, got {k}")
    _check_block_size(block_size)
    # The running best lists and their small merges live in numpy: single-threaded, so thousands of tiny
    # merges do not each wait on a thread pool (which costs milliseconds apiece on a busy machine).
    best_val = np.full((n, k), -np.inf, dtype=np.float32)
    best_idx = np.full((n, k), -1, dtype=np.int64)

    def merge(target: slice, values: np.ndarray, indices: np.ndarray) -> None:
        values = np.concatenate([best_val[target], values], 1)
        indices = np.concatenate([best_idx[target], indices], 1)
        keep = np.argpartition(-values, k - 1, axis=1)[:, :k]
        best_val[target] = np.take_along_axis(values, keep, 1)
        best_idx[target] = np.take_along_axis(indices, keep, 1)

    def merge_sparse(target: slice, local: np.ndarray, index: np.ndarray, value: np.ndarray) -> None:
        """Merge candidates: class `target.start + local` meets class `index` with score `value`."""
        order = np.argsort(local, kind="stable")
        local = local[order]
        counts = np.bincount(local, minlength=target.stop - target.start)
        slot = np.arange(len(local)) - (np.cumsum(counts) - counts)[local]  # arrival rank within its class
        values = np.full((len(counts), counts.max()), -np.inf, dtype=np.float32)
        indices = np.full((len(counts), counts.max()), -1, dtype=np.int64)
        values[local, slot], indices[local, slot] = value[order], index[order]
        merge(target, values, indices)

    # Row blocks last to first. A diagonal tile (r, r) comes first in its row block and gives each of its
    # classes a full top-k; when tile (r, c > r) arrives, the classes of block c have already met every
    # class from c on. So every class has a tight k-th best score to beat, and of an off-diagonal tile
    # only the few entries above its row's or its column's threshold need merging (on random data about
    # k per row and column at first, far fewer later): one compare and one flatnonzero per tile instead
    # of a top-k along the rows plus a transpose and a top-k along the columns.
    starts = range(0, n, block_size)
    pairs = [(r, c) for r in reversed(starts) for c in starts if c >= r]
    if progress:
        from tqdm import tqdm

        pairs = tqdm(pairs, desc="neighbours", unit="block")
    for r0, c0 in pairs:
        rows, cols = slice(r0, min(r0 + block_size, n)), slice(c0, min(c0 + block_size, n))
        scores = score_block(rows, cols)
        if r0 == c0:
            scores.fill_diagonal_(-math.inf)
            top, pos = scores.topk(min(k, scores.shape[1]), dim=1)
            merge(rows, top.numpy(), pos.numpy() + c0)
            continue
        row_bar, col_bar = best_val[rows, k - 1], best_val[cols, k - 1]
        tile = scores.numpy()
        flat = np.flatnonzero((tile > row_bar[:, None]) | (tile > col_bar))  # ~2x faster than torch.nonzero
        row, col = np.divmod(flat, tile.shape[1])
        value = tile[row, col]
        for target, keep, local, index in ((rows, value > row_bar[row], row, col + c0),
                                           (cols, value > col_bar[col], col, row + r0)):
            if keep.any():
                merge_sparse(target, local[keep], index[keep], value[keep])
    order = np.lexsort((best_idx, -best_val), axis=1)
    best_idx, best_val = np.take_along_axis(best_idx, order, 1), np.take_along_axis(best_val, order, 1)
    return torch.from_numpy(best_idx), torch.from_numpy(best_val)


def embedding_knn(embeddings: torch.Tensor, k: int, block_size: int = DEFAULT_BLOCK,
                  progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine neighbours from precomputed L2-normalized embeddings [C, D] -> (indices, scores) [C, k]."""
    _check_block_size(block_size)
    out = torch.empty(block_size, block_size, dtype=embeddings.dtype)

    def score_block(rows: slice, cols: slice) -> torch.Tensor:
        a, b = embeddings[rows], embeddings[cols]
        return torch.mm(a, b.T, out=out[:len(a), :len(b)])

    return topk_blockwise(score_block, len(embeddings), k, block_size, progress)


def shared_name_pairs(names: Sequence[Sequence[str]]) -> np.ndarray:
    """int64 [P, 2] pairs (a, b), a < b, of classes that share a name: a lemma of one equals a lemma
    of the other or a word of one of its multi-word lemmas. names: per class, its lemmas."""
    lemmas = [{n.lower().replace("_", " ").strip() for n in ns} - {""} for ns in names]
    by_lemma: dict[str, set[int]] = {}
    by_word: dict[str, set[int]] = {}
    for c, ls in enumerate(lemmas):
        for lemma in ls:
            by_lemma.setdefault(lemma, set()).add(c)
            words = lemma.replace("-", " ").split()
            for word in words if len(words) > 1 else ():
                by_word.setdefault(word, set()).add(c)
    pairs = set()
    for lemma, classes in by_lemma.items():
        for other in classes | by_word.get(lemma, set()):
            pairs.update((min(c, other), max(c, other)) for c in classes if c != other)
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def combined_knn(wup: WuPalmer, embeddings: torch.Tensor, k: int, alpha: float = DEFAULT_ALPHA,
                 block_size: int = DEFAULT_BLOCK, progress: bool = False,
                 shared_names: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbours by alpha · wup + (1 - alpha) · cos; embeddings: float32 [C, D], L2-normalized.
    shared_names: [P, 2] pairs from `shared_name_pairs`; those with wup < RELATED_WUP are excluded."""
    current: dict[int, torch.Tensor] = {}  # the Wu-Palmer rows of the current row block
    pairs = np.zeros((0, 2), dtype=np.int64) if shared_names is None else np.asarray(shared_names, dtype=np.int64)
    pairs = np.concatenate([pairs, pairs[:, ::-1]])  # both directions: a block may hold either
    pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]

    def score_block(rows: slice, cols: slice) -> torch.Tensor:
        if rows.start not in current:
            current.clear()
            current[rows.start] = wup.block(rows)
        similarity = current[rows.start][:, cols]
        cos = embeddings[rows] @ embeddings[cols].T
        out = cos.mul_(1 - alpha).add_(similarity, alpha=alpha)
        lo, hi = np.searchsorted(pairs[:, 0], [rows.start, rows.stop])
        here = pairs[lo:hi]
        here = here[(here[:, 1] >= cols.start) & (here[:, 1] < cols.stop)]
        if len(here):
            r, c = torch.from_numpy(here[:, 0] - rows.start), torch.from_numpy(here[:, 1] - cols.start)
            unrelated = similarity[r, c] < RELATED_WUP
            out[r[unrelated], c[unrelated]] = -math.inf
        return out

    return topk_blockwise(score_block, len(embeddings), k, block_size, progress)


def _as_encoder(encoder: TextEncoder | str | None) -> TextEncoder:
    return encoder if hasattr(encoder, "encode") else TextEncoder(encoder)


def class_embeddings(wnids: Sequence[str], encoder: TextEncoder | str | None = None,
                     cache_dir: str | Path | None = None, names: Sequence[str] | None = None,
                     progress: bool = False) -> np.ndarray:
    """float32 [C, D] L2-normalized embeddings of `class_texts(wnids, names)`, cached by content."""
    texts = class_texts(wnids, names)
    encoder = _as_encoder(encoder)
    return _embeddings(texts, encoder, digest("embeddings", encoder.identity, texts), ArrayCache(cache_dir),
                       progress)


def _embeddings(texts, encoder, key, cache, progress) -> np.ndarray:
    hit = cache.load("embeddings", key)
    if hit is not None and hit["embeddings"].shape[0] == len(texts):
        log.info("embeddings: reused %s", cache.path("embeddings", key))
        return hit["embeddings"]
    log.info("embeddings: encoding %d class texts with %s", len(texts), getattr(encoder, "name_or_path", encoder))
    embeddings = np.ascontiguousarray(encoder.encode(texts, progress=progress), dtype=np.float32)
    cache.save("embeddings", key, embeddings=embeddings)
    return embeddings


def nearest_categories(wnids: Sequence[str], k: int, alpha: float = DEFAULT_ALPHA,
                       encoder: TextEncoder | str | None = None, cache_dir: str | Path | None = None,
                       names: Sequence[str] | None = None, block_size: int = DEFAULT_BLOCK,
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest categories of every class, itself excluded.

    wnids: C WordNet 3.0 noun synset ids; names: optional class names (else WordNet lemmas) for the
    text; encoder: a TextEncoder, a model dir / hub name, or None for the shipped MiniLM; cache_dir:
    where embeddings and neighbours are kept (None: no cache). A second call with the same inputs
    loads both and never runs the encoder.
    Returns (neighbors int64 [C, k] indices into wnids, scores float32 [C, k]), best first.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _check_block_size(block_size)  # before the embeddings are computed
    repeated = sorted(w for w, n in Counter(wnids).items() if n > 1)
    if repeated:
        raise ValueError(f"wnids repeat {', '.join(repeated)}; each class must appear once")
    if not 1 <= k < len(wnids):
        raise ValueError(f"k must be in [1, {len(wnids) - 1}] for {len(wnids)} classes, got {k}")
    check_noun_synsets(wnids)
    cache = ArrayCache(cache_dir)
    texts = class_texts(wnids, names)
    encoder = _as_encoder(encoder)
    emb_key = digest("embeddings", encoder.identity, texts)
    knn_key = digest("knn", SIMILARITY_VERSION, emb_key, list(wnids), k, alpha)
    hit = cache.load("knn", knn_key)
    if hit is not None and hit["neighbors"].shape == (len(wnids), k):
        log.info("neighbours: reused %s", cache.path("knn", knn_key))
        return hit["neighbors"], hit["scores"]
    embeddings = torch.from_numpy(_embeddings(texts, encoder, emb_key, cache, progress))
    log.info("neighbours: Wu-Palmer over %d classes, alpha %.3g, k %d", len(wnids), alpha, k)
    shared = shared_name_pairs([lemma_names(synset_of(w)) + [n for n in (names[i] if names else "").split(",")]
                                for i, w in enumerate(wnids)])
    indices, scores = combined_knn(WuPalmer(wnids), embeddings, k, alpha, block_size, progress, shared)
    neighbors, scores = indices.numpy(), scores.numpy()
    cache.save("knn", knn_key, neighbors=neighbors, scores=scores)
    return neighbors, scores


def write_knn_tsv(path: str | Path, wnids: Sequence[str], neighbors: np.ndarray, scores: np.ndarray) -> None:
    """`wnid<TAB>neighbor_wnid<TAB>score`, K rows per class in class order, best first (atomic)."""
    neighbors, scores = np.asarray(neighbors), np.asarray(scores)
    if neighbors.shape != scores.shape or neighbors.shape[0] != len(wnids):
        raise ValueError(f"neighbors {neighbors.shape} / scores {scores.shape} do not match {len(wnids)} wnids")
    lines = [f"{wnids[c]}\t{wnids[j]}\t{s:.6f}\n"  # -inf: an excluded pair filled a short list, no neighbour
             for c in range(len(wnids)) for j, s in zip(neighbors[c].tolist(), scores[c].tolist()) if math.isfinite(s)]
    atomic_write_text(path, "".join(lines))


def read_knn_tsv(path: str | Path) -> dict[str, list[tuple[str, float]]]:
    """Read knn.tsv -> {wnid: [(neighbor_wnid, score), ...]} in file order (best first).

    Raises KnnFileError naming the file and line for a wrong field count, a malformed wnid, a
    non-finite or non-numeric score, a class listed as its own neighbour, or a repeated pair.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KnnFileError(f"cannot read {path}: {exc}") from exc
    table: dict[str, list[tuple[str, float]]] = {}
    seen: set[tuple[str, str]] = set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) != 3:
            raise KnnFileError(f"{where}: expected 3 tab-separated fields (wnid, neighbor_wnid, score), "
                               f"got {len(fields)}: {line!r}")
        wnid, other, score_text = fields
        for value in (wnid, other):
            if not WNID.match(value):
                raise KnnFileError(f"{where}: {value!r} is not a wnid")
        try:
            score = float(score_text)
        except ValueError:
            raise KnnFileError(f"{where}: score {score_text!r} is not a number") from None
        if not math.isfinite(score):
            raise KnnFileError(f"{where}: score {score_text!r} is not finite")
        if wnid == other:
            raise KnnFileError(f"{where}: {wnid} is listed as its own neighbour")
        if (wnid, other) in seen:
            raise KnnFileError(f"{where}: pair {wnid} -> {other} repeated")
        seen.add((wnid, other))
        table.setdefault(wnid, []).append((other, score))
    if not table:
        raise KnnFileError(f"{path} has no rows")
    return table

