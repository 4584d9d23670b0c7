"""Stage 1: a per-image weight from the search rank and from the model's predictions relative to the
label's WordNet-KNN categories.

For image i with label y, source s (google/flickr), rank r and top-k predictions (c_j, p_j):

    a_i  = Σ_j p_j · credit(y, c_j),   credit = 1 for c = y, the KNN score of c for c ∈ KNN_K(y), else 0
    π(s, r) = P̂(agreement | source, rank): the mean of a over images of source s in r's rank bin,
              made non-increasing in rank (pool-adjacent-violators): deeper results are never trusted more
    w_i  = σ( logit π(s, r) + logit a_i − logit ā )          (a_i clipped to [ε, 1 − ε])

Reading a_i as P(clean | image) and π as P(clean | rank), and assuming image and rank are independent
given clean/noisy, Bayes' rule gives exactly this posterior (ā, the overall agreement, is the shared
prior both contain once). A prediction that lands on a WordNet neighbour of the label counts as
agreement: a fine-grained near-miss (a sibling breed) is a hard example, not evidence of a wrong label.
An image without predictions keeps π; one without a rank gets its source's average agreement.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

EPS = 0.02


@dataclass(frozen=True, slots=True)
class Stage1Config:
    rank_bins: int = 10
    """rank bins per source (quantiles of the ranks), each with its own π"""
    eps: float = EPS
    """agreement is clipped to [eps, 1 - eps]: no single model output makes a weight exactly 0 or 1"""

    def __post_init__(self):
        if self.rank_bins < 1 or not 0 < self.eps < 0.5:
            raise ValueError(f"rank_bins must be ≥ 1 and eps in (0, 0.5), got {self.rank_bins}, {self.eps}")


def knn_arrays(wnids: Sequence[str], knn: Mapping[str, Sequence[tuple[str, float]]]) -> tuple[np.ndarray, np.ndarray]:
    """{wnid: [(neighbor, score)]} -> (neighbors int64 [C, K] class indices, -1 padded; scores float32
    [C, K] clipped to [0, 1]). Neighbours that are not classes of this data set are ignored."""
    index = {w: i for i, w in enumerate(wnids)}
    K = max((len(v) for v in knn.values()), default=0) or 1
    neighbors = np.full((len(wnids), K), -1, dtype=np.int64)
    scores = np.zeros((len(wnids), K), dtype=np.float32)
    for w, rows in knn.items():
        c = index.get(w)
        if c is None:
            continue
        kept = [(index[n], s) for n, s in rows if n in index][:K]
        for j, (n, s) in enumerate(kept):
            neighbors[c, j], scores[c, j] = n, min(max(s, 0.0), 1.0)
    return neighbors, scores


def agreement(labels: np.ndarray, pred_classes: np.ndarray, pred_probs: np.ndarray,
              neighbors: np.ndarray, scores: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """a [N]: predicted probability mass on the label (full credit) and its K nearest (score credit).

    labels: [N]; pred_classes/pred_probs: [N, k] (class -1 = none); neighbors/scores: [C, K].
    """
    out = np.empty(len(labels), dtype=np.float64)
    for lo in range(0, len(labels), chunk):
        y = labels[lo:lo + chunk]
        pc, pp = pred_classes[lo:lo + chunk], pred_probs[lo:lo + chunk].astype(np.float64)
        credit = (pc == y[:, None]).astype(np.float64)
        match = pc[:, :, None] == neighbors[y][:, None, :]  # [n, k, K]
        match &= pc[:, :, None] >= 0
        credit = np.maximum(credit, (match * scores[y][:, None, :]).max(-1, initial=0.0))
        out[lo:lo + chunk] = (credit * pp).sum(1)
    return np.clip(out, 0.0, 1.0)


def _non_increasing(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted least-squares fit that does not increase (pool-adjacent-violators)."""
    blocks: list[list[float]] = []  # [mean, weight, length]
    for v, w in zip(values.tolist(), weights.tolist()):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks[-1]
            blocks[-1] = [(v1 * w1 + v2 * w2) / max(w1 + w2, 1e-12), w1 + w2, n1 + n2]
    return np.concatenate([np.full(n, v) for v, _, n in blocks])


def rank_prior(sources: Sequence[str], ranks: np.ndarray, agree: np.ndarray, has_pred: np.ndarray,
               bins: int = 10) -> np.ndarray:
    """π [N]: mean agreement of the image's (source, rank bin), non-increasing in rank.

    ranks: float [N] with NaN for unknown; has_pred: bool [N], images without predictions do not
    vote. Unknown rank -> the source's mean agreement.
    """
    sources = np.asarray(sources)
    prior = np.full(len(agree), agree[has_pred].mean() if has_pred.any() else 0.5)
    for source in np.unique(sources):
        of = sources == source
        voters = of & has_pred
        if not voters.any():
            continue
        prior[of] = agree[voters].mean()
        known = of & ~np.isnan(ranks)
        if not (known & has_pred).any():
            continue
        edges = np.unique(np.quantile(ranks[known & has_pred], np.linspace(0, 1, bins + 1)[1:-1]))
        bin_of = np.searchsorted(edges, ranks[known], side="right")
        vote_bin = np.searchsorted(edges, ranks[known & has_pred], side="right")
        counts = np.bincount(vote_bin, minlength=len(edges) + 1).astype(np.float64)
        sums = np.bincount(vote_bin, weights=agree[known & has_pred], minlength=len(edges) + 1)
        means = np.where(counts > 0, sums / np.maximum(counts, 1), agree[voters].mean())
        prior[known] = _non_increasing(means, counts)[bin_of]
    return prior


def logit(p: np.ndarray, eps: float) -> np.ndarray:
    """log(p / (1 − p)) with p clipped to [eps, 1 − eps]."""
    p = np.clip(p, eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def stage1_weights(labels: np.ndarray, sources: Sequence[str], ranks: Sequence[int | None],
                   pred_classes: np.ndarray, pred_probs: np.ndarray, neighbors: np.ndarray,
                   scores: np.ndarray, cfg: Stage1Config = Stage1Config()) -> np.ndarray:
    """Stage-1 weights w [N] in (0, 1) (formula in the module docstring).

    labels: int [N]; sources: [N] "google"/"flickr"; ranks: [N] (None = unknown);
    pred_classes/pred_probs: [N, k] top-k predictions (class -1 = none; a row of -1 = no prediction);
    neighbors/scores: [C, K] from `knn_arrays`.
    """
    labels = np.asarray(labels, dtype=np.int64)
    ranks = np.array([np.nan if r is None else r for r in ranks], dtype=np.float64)
    has_pred = (np.asarray(pred_classes) >= 0).any(1)
    agree = agreement(labels, np.asarray(pred_classes), np.asarray(pred_probs), neighbors, scores)
    prior = rank_prior(sources, ranks, agree, has_pred, cfg.rank_bins)
    mean = agree[has_pred].mean() if has_pred.any() else 0.5
    evidence = np.where(has_pred, logit(agree, cfg.eps) - logit(np.array(mean), cfg.eps), 0.0)
    return 1.0 / (1.0 + np.exp(-(logit(prior, cfg.eps) + evidence)))
