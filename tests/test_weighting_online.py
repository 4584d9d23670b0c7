"""Online weighting (megaclass.weighting.online): the rank-and-text start, the views of the forward
passes in one EM, and the loss-only estimate as DivideMix fits it."""
import numpy as np

from megaclass.weighting.metrics import roc_auc
from megaclass.weighting.online import loss_weights, online_weights, rank_start


def test_rank_start_by_hand():
    sources = ["google", "google", "google", "flickr", "flickr", "google"]
    ranks = np.array([1, 3, 5, 2, 0, 0])  # 0: unknown (as TrainColumns.ranks)
    # google: deepest 5 -> q = 1, 0.5, 0; flickr: deepest 2 -> q = 0 for rank 2; unknown -> 0.5
    expected = (np.array([1.0, 0.5, 0.0, 1.0 - (2 - 1) / max(2 - 1, 1), 0.5, 0.5]) + 0.5) / 2
    np.testing.assert_allclose(rank_start(sources, ranks), expected)
    # a source whose only rank is 1: its images are its top results
    np.testing.assert_allclose(rank_start(["bing"], np.array([1])), [0.75])


def _mixture(n, rng):
    """A known mixture: z ~ P(clean | rank) falling with rank; a text margin ~ N(±0.15, 0.2) by z;
    prediction cells and p(label) by z, independent given z (the views' assumption)."""
    ranks = rng.integers(1, 101, n)
    clean = rng.random(n) < 1.0 - 0.6 * (ranks - 1) / 99
    margin = rng.normal(np.where(clean, 0.15, -0.15), 0.2)
    margin[rng.random(n) < 0.2] = np.nan  # pages that say nothing
    cell = np.where(clean, rng.choice(5, n, p=[0.6, 0.15, 0.05, 0.15, 0.05]),
                    rng.choice(5, n, p=[0.15, 0.2, 0.25, 0.15, 0.25]))
    p_label = np.clip(rng.normal(np.where(clean, 0.6, 0.25), 0.15), 0.0, 1.0)
    return ranks, clean, margin, cell, p_label


def test_online_weights_recover_a_known_mixture_and_each_view_adds():
    rng = np.random.default_rng(0)
    ranks, clean, margin, cell, p_label = _mixture(20_000, rng)
    sources = ["google"] * len(ranks)
    start_details, details = {}, {}
    w0 = online_weights(sources, ranks, margin, details=start_details)
    w = online_weights(sources, ranks, margin, cell, p_label, start=w0, details=details, em_mode="converge")
    assert abs(details["clean_rate"] - clean.mean()) < 0.03, (details["clean_rate"], clean.mean())
    assert details["em_converged"] and start_details["em_converged"]
    # rank and text together beat either alone; the predictions add to both
    auc_rank = roc_auc(-ranks.astype(float), clean)
    speaks = ~np.isnan(margin)
    assert roc_auc(w0, clean) > auc_rank + 0.02
    assert roc_auc(w0[speaks], clean[speaks]) > roc_auc(margin[speaks], clean[speaks]) + 0.01
    assert roc_auc(w, clean) > roc_auc(w0, clean) + 0.05
    # images the model has not seen yet (cell -1) keep the evidence of rank and text only
    unseen = cell.copy()
    unseen[:100] = -1
    w_partial = online_weights(sources, ranks, margin, unseen, p_label, em_mode="converge")
    assert np.isfinite(w_partial).all() and roc_auc(w_partial, clean) > roc_auc(w0, clean)


def test_a_step_re_estimate_is_one_em_step_from_the_weights_in_use():
    """online_em: step. The E-step by its definition: each view refitted to the weights in use, their
    log-odds added to logit of the mean weight. Repeated, the steps approach EM's fixed point."""
    from megaclass.weighting.stage1 import PredictionView, RankView, rank_values
    from megaclass.weighting.stage2 import margin_view

    rng = np.random.default_rng(1)
    ranks, clean, margin, cell, p_label = _mixture(20_000, rng)
    sources = ["google"] * len(ranks)
    w0 = online_weights(sources, ranks, margin)
    details = {}
    w1 = online_weights(sources, ranks, margin, cell, p_label, start=w0, details=details)
    assert details["em_steps"] == 1
    grid = np.round(p_label / 0.01) * 0.01
    views = [RankView(sources, rank_values(ranks)), margin_view(margin), PredictionView(cell, grid)]
    evidence = sum(np.nan_to_num(view(w0), nan=0.0) for view in views)
    by_hand = 1.0 / (1.0 + np.exp(-(np.log(w0.mean() / (1.0 - w0.mean())) + evidence)))
    np.testing.assert_allclose(w1, by_hand, rtol=1e-9, atol=1e-12)
    # the predictions' evidence is in after one step, and repeated steps approach the converged estimate
    converged = online_weights(sources, ranks, margin, cell, p_label, start=w0, em_mode="converge")
    assert roc_auc(w1, clean) > roc_auc(w0, clean) + 0.04
    w = w1
    for _ in range(30):
        w = online_weights(sources, ranks, margin, cell, p_label, start=w)
    assert np.abs(w - converged).mean() < 0.5 * np.abs(w1 - converged).mean()


def _divide_mix_reference(loss):
    """DivideMix's eval_train (Li et al. 2020, github.com/LiJunnan1992/DivideMix, Train_cifar.py), on
    the per-image losses: min-max normalize, a 2-component GMM, the posterior of the low-mean one.
    DivideMix leaves the k-means start unseeded; seeded here, as megaclass seeds it (train.seed)."""
    from sklearn.mixture import GaussianMixture

    losses = (loss - loss.min()) / (loss.max() - loss.min())
    input_loss = losses.reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=0)
    gmm.fit(input_loss)
    prob = gmm.predict_proba(input_loss)
    return prob[:, gmm.means_.argmin()]


def test_loss_weights_are_divide_mix_posteriors_and_unseen_images_get_the_clean_share():
    rng = np.random.default_rng(1)
    clean = rng.random(5000) < 0.7
    loss = np.where(clean, rng.gamma(2.0, 0.3, 5000), rng.gamma(6.0, 0.5, 5000))
    w = loss_weights(loss, seed=0)
    np.testing.assert_allclose(w, _divide_mix_reference(loss), atol=1e-6)
    assert roc_auc(w, clean) > 0.95
    partial = loss.copy()
    partial[:10] = np.nan
    details = {}
    w = loss_weights(partial, seed=0, details=details)
    assert np.all((w > 0) & (w < 1))
    assert np.allclose(w[:10], w[0]) and 0.5 < w[0] < 0.85  # the clean component's share (0.7 drawn)
    assert np.allclose(loss_weights(np.full(4, 1.5)), 0.5)  # nothing to separate
