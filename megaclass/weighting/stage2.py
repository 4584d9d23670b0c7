"""Stage 2: the score s(x_i) that multiplies the cross-entropy, L_i = s(x_i) · CE(x_i).

    t_i  = text feature of image i's keywords (title, description, tags), the query's own words removed
    g_c  = text feature of class c's keywords (names, WordNet gloss, hypernyms)
    m_i  = cos(t_i, g_y) − max_{c ∈ top-k(i), c ≠ y} cos(t_i, g_c)
    s_i  = σ( logit w1_i + clip(m_i / τ, −M, M) )

w1_i is the stage-1 posterior (rank + predictions vs the label's KNN) computed with the predictions
of the model trained with stage-1 weights; the text margin m_i adds evidence on top: does the page
describe the label better than every class the model believes instead? That is what separates a
sibling or the other sense of a shared name (which stage 1 trusts, or cannot tell apart) from the
label. The query's words are removed from the image's keywords because every result of the query
contains them: they cannot tell a right image from a wrong one, and left in, they would make every
page that merely repeats the query look like a match. An image with no keywords left, or no
alternative prediction, gets m_i = 0: no text evidence either way. τ = 0.03 turns a typical margin of
a matching page (+0.1) into +3.3 logits; M = 4 caps the text's say at a factor e⁴ ≈ 55 in the odds.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megaclass.weighting.stage1 import Stage1Config, logit, stage1_weights
from megaclass.weighting.text import KeywordEmbeddings, inverse_document_frequency, select_vocabulary


@dataclass(frozen=True, slots=True)
class Stage2Config:
    tau: float = 0.03
    """temperature of the cosine margin (cosine units per logit)"""
    max_evidence: float = 4.0
    """cap on the text's log-odds contribution"""
    min_df: int = 2
    """image keywords found on fewer images are dropped before encoding: a word seen once is mostly a
    name, an id or a typo, and the web's long tail of them would dominate the encoder's work"""
    max_vocabulary: int = 100_000
    """at most this many image keywords are encoded, the most frequent; a vocabulary that large covers
    the words of a language in use, what lies beyond is names, ids, typos and foreign words"""

    def __post_init__(self):
        if self.tau <= 0 or self.max_evidence <= 0 or self.min_df < 1 or self.max_vocabulary < 1:
            raise ValueError(f"tau, max_evidence, max_vocabulary must be positive and min_df ≥ 1, got {self.tau}, "
                             f"{self.max_evidence}, {self.max_vocabulary}, {self.min_df}")


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


def image_keywords(extractor, titles: Sequence[str], descriptions: Sequence[str], tags: Sequence[str],
                   queries: Sequence[str]) -> list[list[str]]:
    """Keywords of each image's title + description + tags, minus the keywords of its query."""
    out = []
    query_words: dict[str, frozenset] = {}
    for title, description, tag, query in zip(titles, descriptions, tags, queries):
        drop = query_words.get(query)
        if drop is None:
            drop = query_words[query] = frozenset(extractor(query))
        out.append([k for k in extractor(title, description, tag) if k not in drop])
    return out


def text_margin(image_vectors: np.ndarray, labels: np.ndarray, pred_classes: np.ndarray,
                class_vectors: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """m [N] (see module docstring); 0 where the image has no text or no alternative class.

    image_vectors: [N, D] (zero rows = no text); labels: [N]; pred_classes: [N, k] (-1 = none);
    class_vectors: [C, D].
    """
    out = np.zeros(len(labels), dtype=np.float64)
    for lo in range(0, len(labels), chunk):
        t, y, pc = image_vectors[lo:lo + chunk], labels[lo:lo + chunk], pred_classes[lo:lo + chunk]
        own = np.einsum("nd,nd->n", t, class_vectors[y])
        other = np.einsum("nd,nkd->nk", t, class_vectors[np.maximum(pc, 0)])
        valid = (pc >= 0) & (pc != y[:, None])
        best = np.where(valid, other, -np.inf).max(1)
        has = valid.any(1) & (np.abs(t).sum(1) > 0)
        out[lo:lo + chunk] = np.where(has, own - np.where(has, best, 0.0), 0.0)
    return out


def text_vectors(image_kw: Sequence[Sequence[str]], class_kw: Sequence[Sequence[str]],
                 embeddings: KeywordEmbeddings | None = None, min_df: int = 1, max_vocabulary: int | None = None,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(image vectors [N, D], class vectors [C, D]): IDF-weighted keyword bags, IDF over the images;
    image keywords outside `select_vocabulary(image_kw, min_df, max_vocabulary)` are left out."""
    embeddings = embeddings or KeywordEmbeddings()
    if min_df > 1 or max_vocabulary is not None:
        keep = select_vocabulary(image_kw, min_df, max_vocabulary)
        image_kw = [[k for k in ks if k in keep] for ks in image_kw]
    idf, unseen = inverse_document_frequency(image_kw)
    embeddings.add((k for ks in list(image_kw) + list(class_kw) for k in ks), progress=progress)
    return embeddings.bags(image_kw, idf, unseen), embeddings.bags(class_kw, idf, unseen)


def stage2_weights(labels: np.ndarray, sources: Sequence[str], ranks: Sequence[int | None],
                   pred_classes: np.ndarray, pred_probs: np.ndarray, neighbors: np.ndarray, scores: np.ndarray,
                   image_vectors: np.ndarray, class_vectors: np.ndarray,
                   cfg: Stage2Config = Stage2Config(), stage1: Stage1Config = Stage1Config()) -> np.ndarray:
    """Stage-2 scores s [N] in (0, 1) (formula in the module docstring).

    Inputs as `stage1_weights`, plus image_vectors [N, D] and class_vectors [C, D] from `text_vectors`;
    `stage1` configures the w1 inside (the same config a stage-1 run uses).
    """
    labels = np.asarray(labels, dtype=np.int64)
    w1 = stage1_weights(labels, sources, ranks, pred_classes, pred_probs, neighbors, scores, stage1)
    margin = text_margin(image_vectors, labels, np.asarray(pred_classes), class_vectors)
    evidence = np.clip(margin / cfg.tau, -cfg.max_evidence, cfg.max_evidence)
    return 1.0 / (1.0 + np.exp(-(logit(w1, stage1.eps) + evidence)))
