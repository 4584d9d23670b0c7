"""Stage 1: P(label is right) from the search rank and the model's predictions, estimated by EM on
the noisy training data itself (megaclass/weighting/estimate.py; docs/weighting.md).

Two views of each image i (label y, source s, rank r, top-k predictions c_1..c_k with probabilities):

- rank: g_rank(s, r) = P(clean | s, r), non-increasing in r within each source (deeper results are
  never trusted more); an image without a rank gets its source's rate.
- predictions: the image falls in one cell by where the top-1 lies — on y; on one of y's K nearest
  WordNet categories (knn.tsv) with y elsewhere in the top k, or y absent; on another class with y
  in the top k, or y absent — and g_pred(cell, p_y) = P(clean | cell, p_y) is non-decreasing in p_y,
  the probability the model puts on y. How much a prediction on a neighbour counts (a hard near-miss
  of a clean image, or a sibling shown under the wrong label) is what the fit learns, not a credit set
  by hand. An image without predictions gets no evidence from them.

    w_i = σ( logit g_rank + logit g_pred − logit ρ )      (Bayes' rule, views independent given z)

with g_rank, g_pred and ρ = P(clean) the fixed point of EM started from w⁰ = (p_y + ½)/2.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from megaclass.weighting.estimate import MonotoneRate, clip01, em, log_odds_ratio, logit, sigmoid

CELLS = ("label", "neighbour, label in top k", "neighbour, label absent", "other, label in top k",
         "other, label absent")


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


def prediction_cells(labels: np.ndarray, pred_classes: np.ndarray, pred_probs: np.ndarray,
                     neighbors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cell int [N]: index into CELLS, -1 without predictions; p_label float [N]: the probability
    of the label among the top k, 0 when absent)."""
    labels = np.asarray(labels, dtype=np.int64)
    pc, pp = np.asarray(pred_classes), np.asarray(pred_probs, dtype=np.float64)
    on_label = pc == labels[:, None]
    p_label = np.where(on_label, pp, 0.0).sum(1)
    top = pc[:, 0]
    top_is_neighbour = ((neighbors[labels] == top[:, None]) & (top[:, None] >= 0)).any(1)
    in_top_k = on_label.any(1)
    cell = np.where(top == labels, 0, np.where(top_is_neighbour, np.where(in_top_k, 1, 2),
                                               np.where(in_top_k, 3, 4)))
    return np.where((pc >= 0).any(1), cell, -1), p_label


def rank_values(ranks) -> np.ndarray:
    """Search ranks as float64 with NaN for unknown, from [N] ints or None, or an int array (0 = unknown)."""
    if isinstance(ranks, np.ndarray) and ranks.dtype.kind in "iu":
        return np.where(ranks > 0, ranks, np.nan)
    return np.array([np.nan if r is None else r for r in ranks], dtype=np.float64)


class RankView:
    """The EM view of the search rank: P(clean | source, rank), non-increasing in rank per source; an
    image without a rank gets its source's rate. Called with responsibilities it refits (estimate.py's
    views); `at` gives the last fit's evidence for other images."""

    def __init__(self, sources: Sequence[str] | np.ndarray, ranks: np.ndarray):
        self.names, self.source_of = np.unique(np.asarray(sources), return_inverse=True)
        self.source_of = self.source_of.reshape(-1)
        ranks = np.asarray(ranks, dtype=np.float64)
        self.known = ~np.isnan(ranks)
        self.by_rank = MonotoneRate(ranks[self.known], False, self.source_of[self.known])
        self.count = np.bincount(self.source_of, minlength=len(self.names)).astype(np.float64)
        self.rho, self.source_rate = 0.5, None

    def __call__(self, r: np.ndarray) -> np.ndarray:
        self.rho = rho = float(r.mean())
        self.source_rate = (np.bincount(self.source_of, weights=r, minlength=len(self.names)) + rho) / (self.count + 1.0)
        out = self.source_rate[self.source_of]  # unknown rank: the source's rate
        out[self.known] = self.by_rank(r[self.known], rho)
        return log_odds_ratio(out, rho)

    def at(self, sources: Sequence[str] | np.ndarray, ranks: np.ndarray) -> np.ndarray:
        sources, ranks = np.asarray(sources), np.asarray(ranks, dtype=np.float64)
        source = np.minimum(np.searchsorted(self.names, sources), len(self.names) - 1)
        seen = self.names[source] == sources
        out = np.where(seen, self.source_rate[source], np.nan)  # a source never fitted: no evidence
        known = seen & ~np.isnan(ranks)
        by_rank = self.by_rank.at(ranks[known], source[known])  # NaN: the source had no rank in the fit
        out[known] = np.where(np.isnan(by_rank), out[known], by_rank)
        return log_odds_ratio(out, self.rho)


class PredictionView:
    """The EM view of the predictions: P(clean | cell, p_label), non-decreasing in p_label per cell;
    an image without predictions (cell -1) gets no evidence. Refits when called; `at` as `RankView`'s."""

    def __init__(self, cell: np.ndarray, p_label: np.ndarray):
        self.has = cell >= 0
        self.by_cell = MonotoneRate(p_label[self.has], True, cell[self.has])
        self.rho = 0.5

    def __call__(self, r: np.ndarray) -> np.ndarray:
        self.rho = rho = float(r[self.has].mean()) if self.has.any() else float(r.mean())
        out = np.full(len(r), np.nan)
        out[self.has] = self.by_cell(r[self.has], rho)
        return log_odds_ratio(out, rho)

    def at(self, cell: np.ndarray, p_label: np.ndarray) -> np.ndarray:
        out = np.full(len(cell), np.nan)
        has = cell >= 0
        out[has] = self.by_cell.at(p_label[has], cell[has])
        return log_odds_ratio(out, self.rho)


EM_SAMPLE = 1_000_000
"""Stage 1's EM is fitted on at most this many images, a random sample (seeded: the same data gives
the same weights), and the fitted rates then weight every image. What EM estimates is a handful of
curves (a rate per source and rank, one per prediction cell and p_label), which a million images pin
down; its steps, though, grow faster than N on the flat ridge a two-view mixture has (the move
tolerance, estimate.py): 235, 556 and 1,717 steps at 1M, 2M and 4M images (`megaclass bench data`),
the 2,000 cap before 16M. On a sample they do not grow at all. Data up to this size is fitted whole."""


def stage1_weights(labels: np.ndarray, sources: Sequence[str], ranks: Sequence[int | None],
                   pred_classes: np.ndarray, pred_probs: np.ndarray, neighbors: np.ndarray,
                   scores: np.ndarray | None = None, details: dict | None = None) -> np.ndarray:
    """Stage-1 weights w [N] in (0, 1) (module docstring).

    labels: int [N]; sources: [N] source names or codes; ranks: [N] (None = unknown), or an int array
    (0 = unknown, as `TrainColumns.ranks`);
    pred_classes/pred_probs: [N, k] top-k predictions, best first (class -1 = none; a row of -1 = no
    prediction); neighbors: [C, K] from `knn_arrays` (its scores are not used: membership is).
    `details`, when given, receives the fitted rates per cell and the EM's iteration count.
    """
    labels = np.asarray(labels, dtype=np.int64)
    ranks = rank_values(ranks)
    cell, p_label = prediction_cells(labels, pred_classes, pred_probs, neighbors)
    start = (p_label + 0.5) / 2
    sources = np.asarray(sources)
    fitted = em_sample(len(labels))
    by_rank, by_prediction = RankView(sources[fitted], ranks[fitted]), PredictionView(cell[fitted], p_label[fitted])
    info: dict = {}
    w, (_, pred_evidence), iterations = em([by_rank, by_prediction], start[fitted], info=info)
    if len(w) < len(labels):  # fitted on a sample: the fitted rates weight every image
        pred_evidence = by_prediction.at(cell, p_label)
        # the E-step of `em`, in its order of sums: on the sample it gives back EM's weights bit for bit
        w = sigmoid(logit(clip01(np.array(info["prior_rate"]))) + np.nan_to_num(by_rank.at(sources, ranks), nan=0.0)
                    + np.nan_to_num(pred_evidence, nan=0.0))
    if details is not None:
        details.update(clean_rate=float(w.mean()), em_iterations=iterations, em_mean_change=info["mean_change"],
                       em_converged=info["converged"], em_images=int(len(start[fitted])),
                       cell_log_odds={name: round(float(pred_evidence[cell == i].mean()), 3) if (cell == i).any()
                                      else None for i, name in enumerate(CELLS)},
                       cell_share={name: float((cell == i).mean()) for i, name in enumerate(CELLS)})
    return w


def em_sample(n: int, size: int | None = None) -> np.ndarray | slice:
    """The images stage 1's EM is fitted on: all of them (a slice) up to `size` (default `EM_SAMPLE`),
    else that many distinct rows drawn with a fixed seed, in order."""
    size = EM_SAMPLE if size is None else size
    if n <= size:
        return slice(None)
    return np.sort(np.random.default_rng(0).choice(n, size=size, replace=False))
