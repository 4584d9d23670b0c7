"""Stage 1 on hand-computed cases, and the file formats it reads and writes."""
import math

import numpy as np
import pytest

from megaclass.weighting.stage1 import Stage1Config, _non_increasing, agreement, knn_arrays, rank_prior, stage1_weights
from megaclass.weighting.tables import TableError, read_predictions, read_weights, write_predictions, write_weights

WNIDS = ["n00000001", "n00000002", "n00000003", "n00000004"]
KNN = {"n00000001": [("n00000002", 0.8), ("n00000003", 0.3), ("n09999999", 0.9)],  # last: not a class
       "n00000002": [("n00000001", 0.8)]}


def test_knn_arrays_and_agreement_by_hand():
    neighbors, scores = knn_arrays(WNIDS, KNN)
    assert neighbors.tolist() == [[1, 2, -1], [0, -1, -1], [-1, -1, -1], [-1, -1, -1]]
    np.testing.assert_allclose(scores, [[0.8, 0.3, 0], [0.8, 0, 0], [0, 0, 0], [0, 0, 0]], rtol=1e-6)
    labels = np.array([0, 0, 1, 3])
    classes = np.array([[1, 0, 3], [2, 1, -1], [0, 1, 2], [-1, -1, -1]])
    probs = np.array([[0.5, 0.3, 0.2], [0.9, 0.1, 0.0], [0.6, 0.3, 0.1], [0, 0, 0]], dtype=np.float32)
    # 0.5·0.8 (neighbour) + 0.3·1 (label) + 0.2·0 (far) ; 0.9·0.3 + 0.1·0.8 ; 0.6·0.8 + 0.3·1 ; nothing
    np.testing.assert_allclose(agreement(labels, classes, probs, neighbors, scores), [0.7, 0.35, 0.78, 0.0], rtol=1e-6)


def test_pool_adjacent_violators_by_hand():
    np.testing.assert_allclose(_non_increasing(np.array([0.5, 0.7, 0.3]), np.array([1.0, 1.0, 2.0])), [0.6, 0.6, 0.3])
    np.testing.assert_allclose(_non_increasing(np.array([0.2, 0.4, 0.6]), np.ones(3)), [0.4, 0.4, 0.4])
    np.testing.assert_allclose(_non_increasing(np.array([0.9, 0.1, 0.5]), np.array([1.0, 3.0, 1.0])),
                               [0.9, 0.2, 0.2])


def test_rank_prior_never_rises_with_rank():
    rng = np.random.default_rng(0)
    ranks = rng.integers(1, 200, size=2000).astype(float)
    agree = np.clip(0.9 - ranks / 400 + rng.normal(0, 0.3, size=2000), 0, 1)
    prior = rank_prior(["google"] * 2000, ranks, agree, np.ones(2000, bool), bins=10)
    order = np.argsort(ranks, kind="stable")
    assert np.all(np.diff(prior[order]) <= 1e-12)
    assert prior[order][0] > prior[order][-1] + 0.2


def test_stage1_formula_by_hand():
    """One rank bin per source: π = the source's mean agreement; w = σ(logit π + logit a − logit ā)."""
    neighbors, scores = knn_arrays(WNIDS, KNN)
    labels = np.array([0, 0, 1, 1])
    sources = ["google", "google", "flickr", "flickr"]
    classes = np.array([[0, 1], [3, 2], [1, 0], [2, 3]])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5], [0.7, 0.3]])
    a = [0.9 + 0.1 * 0.8, 0.4 * 0.3, 0.5 + 0.5 * 0.8, 0.0]
    mean = sum(a) / 4
    pi = [(a[0] + a[1]) / 2] * 2 + [(a[2] + a[3]) / 2] * 2
    eps = 0.02

    def logit(p):
        p = min(max(p, eps), 1 - eps)
        return math.log(p / (1 - p))

    expected = [1 / (1 + math.exp(-(logit(pi[i]) + logit(a[i]) - logit(mean)))) for i in range(4)]
    got = stage1_weights(labels, sources, [1, 2, 4, 3], classes, probs, neighbors, scores,
                         Stage1Config(rank_bins=1, eps=eps))
    np.testing.assert_allclose(got, expected, rtol=1e-6)  # knn scores are float32
    # An unknown rank takes its source's mean agreement too; here the same number.
    unknown = stage1_weights(labels, sources, [1, 2, None, 3], classes, probs, neighbors, scores,
                             Stage1Config(rank_bins=1, eps=eps))
    np.testing.assert_allclose(unknown[2], expected[2], rtol=1e-6)


def test_image_without_prediction_keeps_its_rank_prior():
    neighbors, scores = knn_arrays(WNIDS, KNN)
    got = stage1_weights(np.array([0, 0, 0]), ["google"] * 3, [1, 1, 1], np.array([[0], [1], [-1]]),
                         np.array([[1.0], [0.5], [0.0]]), neighbors, scores, Stage1Config(rank_bins=1))
    np.testing.assert_allclose(got[2], (1.0 + 0.4) / 2, rtol=1e-6)  # π = mean agreement of the two voters


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
    bad.write_text("a.jpg\t0.5\nb.jpg\t-1\n")
    with pytest.raises(TableError, match="bad.tsv:2: weight must be finite"):
        read_weights(bad)
    with pytest.raises(ValueError, match="finite and non-negative"):
        write_weights(tmp_path / "w.tsv", paths, [float("nan"), 1.0])
