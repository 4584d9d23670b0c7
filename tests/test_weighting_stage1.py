"""Stage 1 on hand-computed cases, EM against a mixture with a known truth, and the file formats."""
import numpy as np
import pytest

from megaclass.weighting.estimate import MonotoneRate, em, log_odds_ratio
from megaclass.weighting.metrics import roc_auc
from megaclass.weighting.stage1 import CELLS, knn_arrays, prediction_cells, stage1_weights
from megaclass.weighting.tables import TableError, read_predictions, read_weights, write_predictions, write_weights

WNIDS = ["n00000001", "n00000002", "n00000003", "n00000004"]
KNN = {"n00000001": [("n00000002", 0.8), ("n00000003", 0.3), ("n09999999", 0.9)],  # last: not a class
       "n00000002": [("n00000001", 0.8)]}


def test_knn_arrays_and_prediction_cells_by_hand():
    neighbors, scores = knn_arrays(WNIDS, KNN)
    assert neighbors.tolist() == [[1, 2, -1], [0, -1, -1], [-1, -1, -1], [-1, -1, -1]]
    np.testing.assert_allclose(scores, [[0.8, 0.3, 0], [0.8, 0, 0], [0, 0, 0], [0, 0, 0]], rtol=1e-6)
    labels = np.array([0, 0, 0, 1, 1, 3])
    classes = np.array([[0, 1, 3], [1, 0, 3], [2, 3, -1], [3, 1, 0], [2, 3, 0], [-1, -1, -1]])
    probs = np.array([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.9, 0.1, 0], [0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0, 0, 0]])
    cell, p_label = prediction_cells(labels, classes, probs, neighbors)
    # top-1 on the label; on neighbour 1, label 2nd; on neighbour 2, label absent; on class 3 (not a
    # neighbour of 1), label 2nd; on class 2, label absent; no predictions
    assert cell.tolist() == [0, 1, 2, 3, 4, -1]
    np.testing.assert_allclose(p_label, [0.5, 0.3, 0.0, 0.3, 0.0, 0.0])
    assert CELLS[1] == "neighbour, label in top k"


def test_monotone_rate_by_hand():
    # x 1, 2, 2, 3 with responsibilities 0.9, 0.2, 0.4, 0.5, non-increasing fit: x=1 alone (0.9); the
    # x=2 pair (mean 0.3) and x=3 (0.5) violate and pool: (0.2 + 0.4 + 0.5)/3. Each block then gets
    # one pseudo-image at the prior 0.6: (0.9 + 0.6)/2 and (1.1 + 0.6)/4.
    got = MonotoneRate(np.array([2.0, 1.0, 3.0, 2.0]), increasing=False)(np.array([0.2, 0.9, 0.5, 0.4]), 0.6)
    np.testing.assert_allclose(got, [1.7 / 4, 1.5 / 2, 1.7 / 4, 1.7 / 4])
    groups = MonotoneRate(np.array([1.0, 2.0, 1.0, 2.0]), True, groups=np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(groups(np.array([0.8, 0.2, 0.1, 0.3]), 0.5),
                               [1.5 / 3, 1.5 / 3, 0.6 / 2, 0.8 / 2])  # group 0 pools, group 1 is already increasing
    np.testing.assert_allclose(log_odds_ratio(np.array([0.75, np.nan]), 0.5), [np.log(3), np.nan])


def mixture(n, rng):
    """Images from stage 1's own model with a known truth: P(clean | rank) falls with rank from 1 at
    the top, the cell depends on clean/noisy only, and 'neighbour, label absent' is never produced by a
    clean image: an anchor on each side, which is what identifies a mixture seen through two views."""
    ranks = rng.integers(1, 101, size=n)
    clean = rng.random(n) < 1.0 - 0.6 * (ranks - 1) / 99
    theta = {True: [0.7, 0.05, 0.0, 0.1, 0.15], False: [0.2, 0.05, 0.3, 0.1, 0.35]}
    cell = np.where(clean, rng.choice(5, size=n, p=theta[True]), rng.choice(5, size=n, p=theta[False]))
    true_log_odds = np.log(np.maximum(theta[True], 1e-12)) - np.log(theta[False])
    # the images' predictions realize those cells for label 0 with neighbour 1 (class 2 is "other")
    neighbors = np.array([[1], [0], [-1]])
    rows = {0: [0, 1], 1: [1, 0], 2: [1, 2], 3: [2, 0], 4: [2, 1]}
    classes = np.array([rows[c] for c in cell])
    probs = np.tile([0.6, 0.4], (n, 1))
    return ranks, clean, cell, classes, probs, neighbors, true_log_odds


def test_em_recovers_a_known_mixture():
    rng = np.random.default_rng(0)
    ranks, clean, cell, classes, probs, neighbors, true_log_odds = mixture(20_000, rng)
    details = {}
    w = stage1_weights(np.zeros(len(ranks), dtype=np.int64), ["google"] * len(ranks), ranks.tolist(), classes, probs,
                       neighbors, details=details)
    assert abs(details["clean_rate"] - clean.mean()) < 0.03, (details["clean_rate"], clean.mean())
    fitted = [details["cell_log_odds"][name] for name in CELLS]
    for i in (3, 4):  # the non-anchor cells: log(θ_clean / θ_noisy), minus the same shared offset
        assert abs((fitted[i] - fitted[0]) - (true_log_odds[i] - true_log_odds[0])) < 0.5, (fitted, true_log_odds)
    assert fitted[2] < -3  # the anchor cell: (almost) only noisy images
    # The true posterior (the generator's P(clean | rank, cell)) is the best any score can do.
    p_rank = np.minimum(1.0 - 0.6 * (ranks - 1) / 99, 1 - 1e-9)
    odds = p_rank / (1 - p_rank) * np.exp(np.clip(true_log_odds[cell], -30, 30))
    assert roc_auc(w, clean) > roc_auc(odds, clean) - 0.005


def test_weights_never_rise_with_rank_and_a_missing_prediction_adds_no_evidence():
    rng = np.random.default_rng(1)
    ranks, clean, cell, classes, probs, neighbors, _ = mixture(4000, rng)
    classes[:50] = -1  # no predictions for the first 50 images
    w = stage1_weights(np.zeros(len(ranks), dtype=np.int64), ["google"] * len(ranks), ranks.tolist(), classes, probs,
                       neighbors)
    for c in range(5):
        of = (cell == c) & (classes[:, 0] >= 0)
        order = np.argsort(ranks[of], kind="stable")
        assert np.all(np.diff(w[of][order]) <= 1e-12)
    # without predictions only the rank speaks: the weight lies between the best and worst cell's
    of = np.arange(len(ranks)) < 50
    same_rank = [w[(ranks == r) & ~of] for r in ranks[of]]
    assert all(s.min() <= x <= s.max() for x, s in zip(w[of], same_rank) if len(s) > 1)


def test_em_fixed_point_satisfies_its_equations():
    """At convergence, r = σ(logit ρ + Σ evidence fitted to r itself), checked with one more step by hand."""
    rng = np.random.default_rng(2)
    x = rng.random(500)
    truth = rng.random(500) < x
    fit = MonotoneRate(x + truth * 0.5, True)
    r, (evidence,), _ = em([lambda r: log_odds_ratio(fit(r, r.mean()), r.mean())], np.full(500, 0.5))
    rho = r.mean()
    again = 1 / (1 + np.exp(-(np.log(rho / (1 - rho)) + log_odds_ratio(fit(r, rho), rho))))
    np.testing.assert_allclose(again, r, atol=1e-4)


def test_tables_round_trip_and_errors(tmp_path):
    paths = ["google/q0001/a.jpg", "flickr/q0002/b.jpg"]
    write_predictions(tmp_path / "p.tsv", paths, WNIDS, np.array([[2, 0], [1, -1]]), np.array([[0.7, 0.2], [0.9, 0]]))
    assert (tmp_path / "p.tsv").read_text() == \
        "google/q0001/a.jpg\tn00000003:0.700000 n00000001:0.200000\nflickr/q0002/b.jpg\tn00000002:0.900000\n"
    preds = read_predictions(tmp_path / "p.tsv", WNIDS)
    classes, probs, found = preds.align(["flickr/q0002/b.jpg", "missing.jpg", "google/q0001/a.jpg"])
    assert classes.tolist() == [[1, -1], [-1, -1], [2, 0]] and found.tolist() == [True, False, True]
    np.testing.assert_allclose(probs, [[0.9, 0], [0, 0], [0.7, 0.2]], rtol=1e-6)

    write_weights(tmp_path / "w.tsv", paths, [0.25, 1.0])
    assert read_weights(tmp_path / "w.tsv") == {paths[0]: 0.25, paths[1]: 1.0}
    write_weights(tmp_path / "w.tsv", paths, [1 / 3, 1 - 1e-12])  # exact round trip, no 6-digit rounding
    assert read_weights(tmp_path / "w.tsv") == {paths[0]: 1 / 3, paths[1]: 1 - 1e-12}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left

    bad = tmp_path / "bad.tsv"
    for text, message in [("a.jpg n00000001:0.5\n", "bad.tsv:1: expected"),
                          ("a.jpg\tn00000001:0.5\nb.jpg\tn00000009:0.5\n", "bad.tsv:2: 'n00000009' is not one of"),
                          ("a.jpg\tn00000001=0.5\n", "is not '<wnid>:<prob>'"),
                          ("a.jpg\tn00000001:1.5\n", "outside"),
                          ("a.jpg\tn00000001:0.5\na.jpg\tn00000001:0.5\n", "bad.tsv:2: image 'a.jpg' listed twice")]:
        bad.write_text(text)
        with pytest.raises(TableError, match=message):
            read_predictions(bad, WNIDS)
    # rounded to 4 decimals: 4 values may sum to 1 + 1e-4 + 4 × 5e-5; a real excess is refused, naming both numbers
    bad.write_text("a.jpg\tn00000001:0.4001 n00000002:0.3001 n00000003:0.2000 n00000004:0.1000\n")
    np.testing.assert_allclose(read_predictions(bad, WNIDS).probs.sum(), 1.0002, rtol=1e-6)
    bad.write_text("a.jpg\tn00000001:0.4006 n00000002:0.3000 n00000003:0.2000 n00000004:0.1000\n")
    with pytest.raises(TableError, match=r"bad.tsv:1: probabilities sum to 1.0006, above 1 by more than the "
                                         r"0.0001 of float32 softmax plus 0.0002 for the rounding of the 4"):
        read_predictions(bad, WNIDS)
    bad.write_text("a.jpg\tn00000001:0.700000 n00000002:0.300200\n")  # 6 decimals: 1e-4 + 2 × 5e-7
    with pytest.raises(TableError, match="sum to 1.0002"):
        read_predictions(bad, WNIDS)
    bad.write_text("a.jpg\t0.5\nb.jpg\t-1\n")
    with pytest.raises(TableError, match="bad.tsv:2: weight must be finite"):
        read_weights(bad)
    with pytest.raises(ValueError, match="finite and non-negative"):
        write_weights(tmp_path / "w.tsv", paths, [float("nan"), 1.0])


def test_weights_written_in_blocks_are_the_pinned_bytes(tmp_path):
    """OUT_TSV written 3 rows at a time (7 rows: the last block short) = the format built here by hand;
    read back as columns it gives the same paths and floats; a repeated image names its second line."""
    from megaclass.data.columns import StringColumn
    from megaclass.weighting.tables import read_weight_column

    rng = np.random.default_rng(0)
    paths = [f"google/q{i:04d}/é{i}.jpg" for i in range(7)]
    weights = rng.random(7).tolist()
    weights[2] = 1.0
    write_weights(tmp_path / "w.tsv", StringColumn.from_strings(paths), weights, block=3)
    assert (tmp_path / "w.tsv").read_bytes() == "".join(f"{p}\t{repr(w)}\n" for p, w in zip(paths, weights)).encode()
    images, read = read_weight_column(tmp_path / "w.tsv")
    assert images.tolist() == paths and read.tolist() == weights
    (tmp_path / "twice.tsv").write_text("a.jpg\t0.5\nb.jpg\t0.5\n\na.jpg\t0.25\n")
    with pytest.raises(TableError, match="twice.tsv:4: image 'a.jpg' listed twice"):
        read_weight_column(tmp_path / "twice.tsv")
