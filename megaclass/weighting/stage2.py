"""Stage 2: the score s(x_i) that multiplies the cross-entropy, L_i = s(x_i) · CE(x_i): stage 1's
weight plus the evidence of the page text, estimated by EM on the training data (docs/weighting.md).

    t_i  = text feature of image i's keywords (title, description, tags), the query's own words removed
    g_c  = text feature of class c's keywords (names, WordNet gloss, hypernyms)
    m_i  = cos(t_i, g_y) − max_{c ∈ top-k(i), c ≠ y} cos(t_i, g_c)    top-k: the stage-1 model's predictions
    s_i  = σ( logit w1_i + logit h(m_i) − logit ρ )

w1_i is image i's stage-1 weight; h(m) = P(clean | m) is non-decreasing in the margin (a page that
describes the label better than every class the model believes instead is never less likely right),
fitted by isotonic regression inside EM with w1 as each image's prior (estimate.py), and ρ the clean
rate among the images with a margin. The margin is what separates a sibling or the other sense of a
shared name (which stage 1 trusts, or cannot tell apart) from the label. The query's words are
removed from the image's keywords because every result of the query contains them: they cannot tell
a right image from a wrong one. A page that says nothing — no keywords left, or no alternative
prediction — has no margin and keeps its stage-1 weight exactly: s_i = w1_i.
"""
from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import filterfalse

import numpy as np

from megaclass.data.columns import array_column
from megaclass.weighting.estimate import MonotoneRate, em, log_odds_ratio, logit
from megaclass.weighting.text import KeywordBags, KeywordEmbeddings, inverse_document_frequency, vocabulary_mask


@dataclass(frozen=True, slots=True)
class Stage2Config:
    """Compute budget of the text features (not model constants: they bound the encoder's work)."""

    min_df: int = 2
    """image keywords found on fewer images are dropped before encoding: a word seen once is mostly a
    name, an id or a typo, and the web's long tail of them would dominate the encoder's work"""
    max_vocabulary: int = 100_000
    """at most this many image keywords are encoded, the most frequent; a vocabulary that large covers
    the words of a language in use, what lies beyond is names, ids, typos and foreign words"""

    def __post_init__(self):
        if self.min_df < 1 or self.max_vocabulary < 1:
            raise ValueError(f"max_vocabulary must be positive and min_df ≥ 1, got {self.max_vocabulary}, {self.min_df}")


def class_descriptions(synsets: Sequence[tuple[str, str]]) -> list[str]:
    """One text per class: names, WordNet gloss and hypernyms (semantics' `class_texts`); a wnid
    WordNet does not know keeps its synsets.txt text alone."""
    from megaclass.semantics import class_texts

    texts = []
    for wnid, names in synsets:
        try:
            texts.append(class_texts([wnid], [names])[0])
        except (KeyError, ValueError):
            texts.append(names)
    return texts


def keyword_bags(extractor, titles: Iterable[str], descriptions: Iterable[str], tags: Iterable[str],
                 queries: Iterable[str]) -> KeywordBags:
    """Keywords of each image's title + description + tags, minus the keywords of its query, as columns.
    Each argument yields one string per image (a `StringColumn` streams them; `queries` may be a
    `query_texts[data.train.queries]`-style indexing, repeated strings are extracted once)."""
    index: dict[str, int] = {}
    ids, offsets = array("i"), array("q", [0])
    query_words: dict[str, frozenset] = {}
    for title, description, tag, query in zip(titles, descriptions, tags, queries):
        drop = query_words.get(query)
        if drop is None:
            drop = query_words[query] = frozenset(extractor(query))
        kept = list(filterfalse(drop.__contains__, extractor(title, description, tag)))
        try:  # C-level lookups once the words are known; a new word is added in order of first sight
            ids.extend(list(map(index.__getitem__, kept)))
        except KeyError:
            ids.extend([index.setdefault(k, len(index)) for k in kept])
        offsets.append(len(ids))
    return KeywordBags(list(index), array_column(ids, np.int32), array_column(offsets, np.int64))


def image_keywords(extractor, titles: Sequence[str], descriptions: Sequence[str], tags: Sequence[str],
                   queries: Sequence[str]) -> list[list[str]]:
    """`keyword_bags` as one list of keywords per image."""
    return keyword_bags(extractor, titles, descriptions, tags, queries).tolist()


def text_margin(image_vectors: np.ndarray, labels: np.ndarray, pred_classes: np.ndarray,
                class_vectors: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """m [N] (see module docstring); NaN where the image has no text or no alternative class.

    image_vectors: [N, D] (zero rows = no text); labels: [N]; pred_classes: [N, k] (-1 = none);
    class_vectors: [C, D]. Computed `chunk` images at a time (a chunk's class vectors are [chunk, k, D]).
    """
    out = np.empty(len(labels), dtype=np.float64)
    for lo in range(0, len(labels), chunk):
        t, y, pc = image_vectors[lo:lo + chunk], labels[lo:lo + chunk], pred_classes[lo:lo + chunk]
        own = np.einsum("nd,nd->n", t, class_vectors[y])
        other = np.einsum("nd,nkd->nk", t, class_vectors[np.maximum(pc, 0)])
        valid = (pc >= 0) & (pc != y[:, None])
        best = np.where(valid, other, -np.inf).max(1)
        has = valid.any(1) & (np.abs(t).sum(1) > 0)
        out[lo:lo + chunk] = np.where(has, own - np.where(has, best, 0.0), np.nan)
    return out


def _vocabulary(image_kw: KeywordBags | Sequence[Sequence[str]], class_kw: Sequence[Sequence[str]],
                embeddings: KeywordEmbeddings | None, min_df: int, max_vocabulary: int | None, progress: bool):
    """(embeddings with every kept keyword encoded, the image bags without the words left out, IDF of
    each kept word, IDF of an unseen word)."""
    embeddings = embeddings or KeywordEmbeddings()
    image_kw = KeywordBags.of(image_kw)
    if min_df > 1 or max_vocabulary is not None:
        image_kw = image_kw.keep(vocabulary_mask(image_kw, min_df, max_vocabulary))
    idf, unseen = inverse_document_frequency(image_kw)
    embeddings.add(list(idf) + [k for ks in class_kw for k in ks], progress=progress)
    return embeddings, image_kw, idf, unseen


def text_vectors(image_kw: KeywordBags | Sequence[Sequence[str]], class_kw: Sequence[Sequence[str]],
                 embeddings: KeywordEmbeddings | None = None, min_df: int = 1, max_vocabulary: int | None = None,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(image vectors [N, D], class vectors [C, D]): IDF-weighted keyword bags, IDF over the images;
    image keywords outside `vocabulary_mask(image_kw, min_df, max_vocabulary)` are left out."""
    embeddings, image_kw, idf, unseen = _vocabulary(image_kw, class_kw, embeddings, min_df, max_vocabulary, progress)
    return embeddings.bags(image_kw, idf, unseen), embeddings.bags(class_kw, idf, unseen)


class TextMargins:
    """The text features of every image and class, built once (the vocabulary encoded, the IDF counted);
    calling it gives `text_margin` against any alternatives, `chunk` images at a time: the [N, D] image
    vectors (25 GB at 16M images) never exist, only a chunk's."""

    def __init__(self, image_kw: KeywordBags | Sequence[Sequence[str]], class_kw: Sequence[Sequence[str]],
                 embeddings: KeywordEmbeddings | None = None, min_df: int = 1, max_vocabulary: int | None = None,
                 progress: bool = False):
        embeddings, image_kw, idf, unseen = _vocabulary(image_kw, class_kw, embeddings, min_df, max_vocabulary,
                                                        progress)
        self.class_vectors = embeddings.bags(class_kw, idf, unseen)
        self.pool = embeddings.pooler(image_kw, idf, unseen)
        self.size = len(image_kw)

    def __call__(self, labels: np.ndarray, alternatives: np.ndarray, chunk: int = 8192) -> np.ndarray:
        """m [N]: labels [N]; alternatives [N, k] the classes the label is compared with (-1 = none)."""
        labels, alternatives = np.asarray(labels, dtype=np.int64), np.asarray(alternatives)
        out = np.empty(self.size, dtype=np.float64)
        for lo in range(0, self.size, chunk):
            hi = min(lo + chunk, self.size)
            out[lo:hi] = text_margin(self.pool(lo, hi), labels[lo:hi], alternatives[lo:hi], self.class_vectors, chunk)
        return out


def text_margins(image_kw: KeywordBags | Sequence[Sequence[str]], class_kw: Sequence[Sequence[str]],
                 labels: np.ndarray, pred_classes: np.ndarray, embeddings: KeywordEmbeddings | None = None,
                 min_df: int = 1, max_vocabulary: int | None = None, chunk: int = 8192,
                 progress: bool = False) -> np.ndarray:
    """`text_margin` of `text_vectors` against the predicted classes (`TextMargins`, used once)."""
    return TextMargins(image_kw, class_kw, embeddings, min_df, max_vocabulary, progress)(labels, pred_classes, chunk)


def stage2_weights(w1: np.ndarray, labels: np.ndarray, pred_classes: np.ndarray, image_vectors: np.ndarray,
                   class_vectors: np.ndarray, details: dict | None = None) -> np.ndarray:
    """Stage-2 scores s [N] in (0, 1) (module docstring).

    w1: [N] stage-1 weights in (0, 1); labels: [N]; pred_classes: [N, k] the stage-1 model's top-k
    (-1 = none); image_vectors [N, D] and class_vectors [C, D] from `text_vectors`. `details` as in
    `stage2_from_margins`.
    """
    _check_stage1(w1)
    margin = text_margin(image_vectors, np.asarray(labels, dtype=np.int64), np.asarray(pred_classes), class_vectors)
    return stage2_from_margins(w1, margin, details)


def margin_view(margin: np.ndarray):
    """The EM view of the page text: P(clean | margin), non-decreasing in the margin (NaN: the page
    says nothing, no evidence)."""
    speaks = ~np.isnan(margin)
    by_margin = MonotoneRate(margin[speaks], True) if speaks.any() else None  # sorted once, not per EM step

    def fit(r: np.ndarray) -> np.ndarray:
        out = np.full(len(r), np.nan)
        if by_margin is not None:
            rho = float(r[speaks].mean())
            out[speaks] = log_odds_ratio(by_margin(r[speaks], rho), rho)
        return out

    return fit


def _check_stage1(w1) -> np.ndarray:
    w1 = np.asarray(w1, dtype=np.float64)
    if np.any((w1 <= 0) | (w1 >= 1)) or not np.all(np.isfinite(w1)):
        raise ValueError("stage-1 weights must lie strictly between 0 and 1 (posteriors)")
    return w1


def stage2_from_margins(w1: np.ndarray, margin: np.ndarray, details: dict | None = None) -> np.ndarray:
    """Stage-2 scores s [N] from the stage-1 weights w1 [N] in (0, 1) and the text margins [N]
    (`text_margins`; NaN: the page says nothing). `details`, when given, receives the share of pages
    with a margin and the EM's iteration count, last mean move and whether it converged."""
    w1 = _check_stage1(w1)
    speaks = ~np.isnan(margin)
    info: dict = {}
    s, _, iterations = em([margin_view(margin)], w1, prior_logit=logit(w1), info=info)
    s[~speaks] = w1[~speaks]  # no evidence: exactly the stage-1 weight, not a rounding of it
    if details is not None:
        details.update(pages_with_margin=float(speaks.mean()), em_iterations=iterations,
                       em_mean_change=info["mean_change"], em_converged=info["converged"])
    return s
