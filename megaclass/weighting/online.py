"""Weights estimated during one training (`experiment.mode: online | online_loss`, docs/weighting.md).

`online`: the views of stage 1 and stage 2 in one EM (estimate.py), refitted at each epoch end.

- Before any model exists, two views need none: the search rank (`RankView`) and the page text's
  margin against the label's K nearest categories (`margin_view` of m_i = cos(t_i, g_y) −
  max_{c ∈ KNN(y)} cos(t_i, g_c)): a page that describes its label better than the label's WordNet
  neighbours is never less likely right. EM starts from the rank alone, `rank_start`.
- From the warm-up epoch on, the training forward passes give each image's predictions; averaged over
  the epochs seen (megaclass.engine.online), they add the prediction view of stage 1 (the most frequent
  cell against the label's K nearest categories, the mean p(label)) and the text margin moves to the
  classes the model predicts, as in stage 2.

The image's loss is not a view here: with p(label) already in, −log p(label) would count the same
evidence twice (the views' combination assumes them independent given the label's truth).

`online_loss`: the per-image loss averaged over the epochs seen, alone: DivideMix's signal (Li et al.
2020) without its two networks: a two-component Gaussian mixture on the min-max normalized losses,
fitted as DivideMix fits it (scikit-learn, 10 EM steps, tolerance 1e-2, covariance floor 5e-4), and
P(clean) = the posterior of the component with the smaller mean.
"""
from __future__ import annotations

import numpy as np

from megaclass.weighting.estimate import clip01, em
from megaclass.weighting.stage1 import PredictionView, RankView, rank_values
from megaclass.weighting.stage2 import margin_view


P_LABEL_STEP = 0.01
"""The mean p(label) is fitted on a grid of this step. A mean over epochs takes a distinct value on
nearly every image, and an isotonic fit over N distinct values keeps moving a block boundary by a few
images at every EM step (estimate.py, TOLERANCE): on 20,000 simulated images three views then hit
the 2,000-step cap, on the grid they converge in 70 steps to weights of the same AUC (0.983)."""


def rank_start(sources, ranks) -> np.ndarray:
    """EM's first responsibilities without a model: (q + ½)/2 with q = 1 − (rank − 1)/(the source's
    deepest rank), ½ where the rank is unknown: top results are mostly right (the instrument)."""
    source_of = np.unique(np.asarray(sources), return_inverse=True)[1]
    ranks = rank_values(ranks)
    known = ~np.isnan(ranks)
    deepest = np.zeros(source_of.max() + 1 if len(source_of) else 0)
    np.maximum.at(deepest, source_of[known], ranks[known])
    q = np.full(len(ranks), 0.5)
    depth = deepest[source_of[known]]
    q[known] = np.where(depth > 1, 1.0 - (ranks[known] - 1.0) / np.maximum(depth - 1.0, 1.0), 1.0)
    return (q + 0.5) / 2


def online_weights(sources, ranks, margin: np.ndarray, cell: np.ndarray | None = None,
                   p_label: np.ndarray | None = None, start: np.ndarray | None = None,
                   details: dict | None = None, em_mode: str = "step") -> np.ndarray:
    """P(the label is right) [N] from the rank and the text margin [N] (NaN: the page says nothing) and,
    once the model has seen images, their prediction cell [N] (-1: not seen yet) and mean p(label) [N].
    EM starts from `start` [N] in (0, 1), the previous estimate (default: `rank_start`): a young
    model's predictions carry little, and EM started from them, as stage 1 starts from a trained
    model's, settles where they put it. With the model's views in, `em_mode` "step" moves one EM step
    from `start` (online EM: each re-estimate's new evidence advances the weights in use by a step, so a
    young model's views cannot carry them to a fixed point of their own); "converge" runs EM to its
    fixed point. Without them (the start weights) EM always converges."""
    views = [RankView(sources, rank_values(ranks)), margin_view(margin)]
    start = rank_start(sources, ranks) if start is None else clip01(np.asarray(start, dtype=np.float64))
    model_in = cell is not None and bool((cell >= 0).any())
    if model_in:
        p_label = np.round(np.nan_to_num(p_label) / P_LABEL_STEP) * P_LABEL_STEP
        views.append(PredictionView(cell, p_label))
    info: dict = {}
    # the start (no model yet) is fitted to convergence; with the model's views, `step` moves one EM step
    w, _, steps = em(views, start, info=info, one_step=model_in and em_mode == "step")
    if details is not None:
        details.update(clean_rate=float(w.mean()), em_steps=steps, em_mean_change=info["mean_change"],
                       em_converged=info["converged"])
    return w


def loss_weights(loss: np.ndarray, seed: int = 0, details: dict | None = None) -> np.ndarray:
    """P(clean) [N] from each image's mean loss [N] (NaN: not seen yet, P = the clean component's share)."""
    from sklearn.mixture import GaussianMixture

    seen = ~np.isnan(loss)
    x = loss[seen]
    span = x.max() - x.min() if len(x) else 0.0
    if len(x) < 2 or span <= 0:  # nothing to separate
        return np.full(len(loss), 0.5)
    x = ((x - x.min()) / span)[:, None]
    gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=seed).fit(x)
    clean = int(np.argmin(gmm.means_[:, 0]))
    w = np.full(len(loss), float(gmm.weights_[clean]))
    w[seen] = gmm.predict_proba(x)[:, clean]
    if details is not None:
        details.update(clean_rate=float(w.mean()), gmm_means=[round(float(m), 4) for m in gmm.means_[:, 0]],
                       gmm_converged=bool(gmm.converged_))
    return clip01(w)
