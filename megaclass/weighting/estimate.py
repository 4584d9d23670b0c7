"""Estimating P(label is right) from the noisy training data alone: monotone fits inside EM.

Each image i has a latent z_i (clean: its label is what it shows) and several *views* of it that are
assumed independent given z: the search rank (and source), the model's predictions, the page text.
For each view v with observation x_v, the quantity estimated is g_v(x) = P(clean | x_v = x); Bayes'
rule with conditional independence then combines the views exactly:

    logit P(clean | all views) = logit ρ + Σ_v (logit g_v(x_v) − logit ρ)       ρ = P(clean)

No view is binned or thresholded: every g_v is a *monotone* function of a scalar of the view (deeper
rank never more trustworthy; more probability on the label never less; a page that describes the label
better than the classes the model believes instead never less), fitted by isotonic regression —
the maximum-likelihood monotone estimate of a Bernoulli rate. A block of n images with clean mass k
gets (k + ρ)/(n + 1): one pseudo-image at the overall rate, so no block is ever exactly 0 or 1
(the posterior of a Bernoulli rate under a Beta prior of strength one centred on ρ).

The z are not observed, so the fit is EM: start from a soft guess, E-step = the combination above,
M-step = the isotonic fits of the current responsibilities. Identification comes from the
instrument: the rank is informative of z (top results are mostly clean) while independent of the
predictions given z, so the predictions' g is learned from how their distribution shifts with rank.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import isotonic_regression

TOLERANCE = 1e-5
"""EM stops when the responsibilities move less than this on average over an extrapolated cycle (a
numerical tolerance, not a model choice). The mean, not the largest move: an isotonic fit is piecewise
constant, and as N grows some block boundary moves by a few images at nearly every step, flipping
those images by up to a block's jump (~1e-3) long after the fit as a whole has settled; a criterion on
the largest move therefore needed more steps the more images there were (2,000, the cap, at 1M).
What remains after this tolerance is a slow drift of the overall clean rate along the nearly flat
ridge of a two-view mixture, which leaves the order of the weights unchanged: on `megaclass bench data`'s
100k images, 1e-5 took 490 steps, 1e-6 hit the 2,000 cap, and the two sets of weights differ by 0.005
on average with Spearman correlation 0.999999."""
MAX_ITERATIONS = 2000


def logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class MonotoneRate:
    """P̂(clean | group, x) for fixed (group, x) of N images, refitted to new responsibilities r:
    within each group, the isotonic (weighted least squares = Bernoulli ML) fit of r on x, equal x
    pooled first, each fitted block shrunk to (Σr + ρ)/(n + 1) (blocks re-pooled where shrinking
    broke the order). The sort is done once, here; a refit is one weighted bincount over the N images,
    isotonic fits over the distinct (group, x) cells, and one gather back to the images."""

    def __init__(self, x: np.ndarray, increasing: bool, groups: np.ndarray | None = None):
        x = np.asarray(x, dtype=np.float64)
        groups = np.zeros(len(x), dtype=np.int64) if groups is None else np.asarray(groups)
        self.increasing = increasing
        # cell = the distinct (group, x) pairs, sorted by group then x; each group a run of cells
        group_ids, group_of = np.unique(groups, return_inverse=True)
        cells, self.cell_of, counts = np.unique(np.stack([group_of.astype(np.float64), x]), axis=1,
                                                return_inverse=True, return_counts=True)
        self.cell_of = self.cell_of.reshape(-1)
        self.counts = counts.astype(np.float64)
        self.bounds = np.searchsorted(cells[0], np.arange(len(group_ids) + 1))  # cells of group g: [b[g], b[g+1])
        self.group_ids, self.cell_x = group_ids, cells[1]
        self.values: np.ndarray | None = None  # each cell's rate in the last fit
        self.size = len(x)

    def __call__(self, r: np.ndarray, prior: float) -> np.ndarray:
        all_sums = np.bincount(self.cell_of, weights=r, minlength=len(self.counts))
        value = np.empty(len(self.counts))
        for lo, hi in zip(self.bounds[:-1], self.bounds[1:]):
            sums, counts = all_sums[lo:hi], self.counts[lo:hi]
            fit = isotonic_regression(sums / counts, weights=counts, increasing=self.increasing)
            block = np.repeat(np.arange(len(fit.blocks) - 1), np.diff(fit.blocks))
            block_n = np.bincount(block, weights=counts)
            block_k = np.bincount(block, weights=sums)
            # Shrinking blocks of unequal size can undo the order (a lone extreme block moves most): one
            # more isotonic pass over the shrunk blocks, weighted by n + 1, restores it.
            shrunk = isotonic_regression((block_k + prior) / (block_n + 1.0), weights=block_n + 1.0,
                                         increasing=self.increasing).x
            value[lo:hi] = shrunk[block]
        self.values = value
        return value[self.cell_of]

    def at(self, x: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
        """The last fit as a step function of other points: each x takes the rate of the largest fitted
        x ≤ it in its group (of the smallest where it lies below them all); NaN in a group the fit never
        saw. At the fitted points themselves it is the fit."""
        x = np.asarray(x, dtype=np.float64)
        groups = np.zeros(len(x), dtype=self.group_ids.dtype) if groups is None else np.asarray(groups)
        out = np.full(len(x), np.nan)
        group = np.minimum(np.searchsorted(self.group_ids, groups), len(self.group_ids) - 1)
        seen = self.group_ids[group] == groups
        for g, (lo, hi) in enumerate(zip(self.bounds[:-1], self.bounds[1:])):
            rows = np.flatnonzero(seen & (group == g))
            below = np.searchsorted(self.cell_x[lo:hi], x[rows], side="right") - 1
            out[rows] = self.values[lo + np.maximum(below, 0)]
        return out


def clip01(p: np.ndarray) -> np.ndarray:
    """Keep probabilities off exactly 0 and 1 by the float resolution only (logit must be finite)."""
    tiny = np.finfo(np.float64).eps
    return np.clip(p, tiny, 1 - tiny)


def log_odds_ratio(g: np.ndarray, rho: float) -> np.ndarray:
    """A view's evidence in logits: logit g − logit ρ (NaN stays NaN: the view says nothing there)."""
    return logit(clip01(g)) - logit(clip01(np.array(rho)))


def em(views, start: np.ndarray, prior_logit: np.ndarray | None = None, info: dict | None = None,
       one_step: bool = False):
    """EM over `views`: callables `fit(r) -> evidence [N]` (a view's log-odds ratio, logit g − logit ρ,
    refitted to the responsibilities r; NaN where the view says nothing). The E-step adds the views'
    evidence to `prior_logit` [N] (fixed log-odds from outside the fit, e.g. stage 1's weight in stage 2)
    or, without it, to logit ρ with ρ the current mean responsibility. Iterated to its fixed point with
    SQUAREM (Varadhan & Roland 2008: two EM steps, then a step along their extrapolation, kept only if
    it stays a valid responsibility), since plain EM crawls along the nearly flat ridge a two-view
    mixture has. `one_step`: a single plain EM step from `start` instead (online EM). Returns (posterior
    [N], the views' evidence, EM steps); `info`, when given, receives the last cycle's mean and largest
    move and whether the tolerance was reached (not the step cap)."""

    def step(r: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        evidence = [fit(r) for fit in views]
        total = np.full(len(r), logit(clip01(np.array(r.mean())))) if prior_logit is None else prior_logit.copy()
        for e in evidence:
            total += np.nan_to_num(e, nan=0.0)
        return sigmoid(total), evidence

    r = np.asarray(start, dtype=np.float64)
    steps = 0
    moved = largest = float("inf")
    while not one_step and steps < MAX_ITERATIONS:
        r1, _ = step(r)
        r2, _ = step(r1)
        steps += 2
        d, v = r1 - r, r2 - 2 * r1 + r
        norm_v = float(np.sqrt(np.square(v).sum()))  # not np.linalg.norm: BLAS threads crawl on a busy machine
        alpha = -float(np.sqrt(np.square(d).sum())) / norm_v if norm_v > 0 else -1.0
        alpha = min(alpha, -1.0)  # -1 is plain EM (r2)
        jump = r - 2 * alpha * d + alpha * alpha * v
        candidate = jump if np.all((jump > 0) & (jump < 1)) else r2
        new, _ = step(candidate)
        steps += 1
        change = np.abs(new - r)
        moved, largest = float(change.mean()), float(change.max())
        r = new
        if moved < TOLERANCE:
            break
    r_final, evidence = step(r)
    if one_step:  # the one plain E-step above, from `start`
        change = np.abs(r_final - r)
        moved, largest = float(change.mean()), float(change.max())
    if info is not None:  # prior_rate: the ρ of the returned E-step (without prior_logit)
        info.update(mean_change=moved, max_change=largest, converged=moved < TOLERANCE, prior_rate=float(r.mean()))
    return r_final, evidence, steps + 1
