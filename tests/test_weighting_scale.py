"""The weighting's paths for millions of images, against independent references: PRED_TSV read a
block at a time (fast path and line-by-line fallback mixed), the monotone fit as a step function of
new points, and stage 1's EM fitted on a sample."""
import numpy as np
import pytest

from megaclass.weighting import stage1, tables
from megaclass.weighting.estimate import MonotoneRate
from megaclass.weighting.metrics import roc_auc
from megaclass.weighting.stage1 import stage1_weights
from megaclass.weighting.tables import TableError, read_predictions

WNIDS = [f"n{i:08d}" for i in range(1, 7)]


def test_predictions_read_in_blocks_equal_a_plain_parse(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "BLOCK_LINES", 4)  # many blocks; some go the fast way, some line by line
    rng = np.random.default_rng(3)
    lines, expected = [], []
    for i in range(50):
        k = int(rng.integers(0, 4))
        classes = rng.choice(6, size=k, replace=False).tolist()
        probs = (rng.dirichlet(np.ones(k + 1))[:k]).tolist()
        # plain decimals mostly, and what only the line-by-line reader takes: 1e-3, "1", CRLF, blank lines
        style = i % 7
        texts = [f"{p:.6f}" if style else f"{p:.3e}" for p in probs]
        if style == 3 and k:
            texts[0], probs[0] = "0", 0.0
        line = f"google/q{i:04d}/{i}.jpg\t" + " ".join(f"{WNIDS[c]}:{t}" for c, t in zip(classes, texts))
        lines.append(line + ("\r\n" if style == 5 else "\n") + ("\n" if style == 6 else ""))
        expected.append((f"google/q{i:04d}/{i}.jpg", classes, [float(t) for t in texts]))
    (tmp_path / "p.tsv").write_text("".join(lines), newline="")
    got = read_predictions(tmp_path / "p.tsv", WNIDS)
    assert got.paths.tolist() == [path for path, _, _ in expected]
    k = got.classes.shape[1]
    for row, (_, classes, probs) in enumerate(expected):
        assert got.classes[row].tolist() == classes + [-1] * (k - len(classes))
        np.testing.assert_array_equal(got.probs[row], np.array(probs + [0.0] * (k - len(probs)), dtype=np.float32))


@pytest.mark.parametrize("bad, message", [
    ("a.jpg\tn00000001:0.5:n00000002 0.3\n", "probability '0.5:n00000002' is not a number"),  # colons shifted
    ("a.jpg\tn00000001:0.6 n00000001:0.3\n", "class n00000001 named twice"),
    ("a.jpg\tn00000001:0.700000 n00000002:0.300200\n", "probabilities sum to 1.0002"),
    ("a.jpg\tn00000001:1.2\n", "outside"),
    ("a.jpg\tn00000009:0.5\n", "'n00000009' is not one of"),
    ("b.jpg\tn00000002:0.5\n", "image 'b.jpg' listed twice"),
])
def test_a_bad_line_deep_in_a_block_is_named(tmp_path, monkeypatch, bad, message):
    monkeypatch.setattr(tables, "BLOCK_LINES", 8)
    good = [f"x/{i}.jpg\tn00000002:0.5 n00000003:0.25\n" for i in range(10)]
    good[3] = "b.jpg\tn00000002:0.5\n"
    (tmp_path / "p.tsv").write_text("".join(good[:9]) + bad + good[9])  # line 10: the second block
    with pytest.raises(TableError, match=f"p.tsv:10: .*{message}" if "twice" not in message else "p.tsv:10: " + message):
        read_predictions(tmp_path / "p.tsv", WNIDS)


def test_monotone_rate_at_new_points_by_hand():
    fit = MonotoneRate(np.array([1.0, 2.0, 3.0, 1.0, 5.0]), increasing=True, groups=np.array([0, 0, 0, 2, 2]))
    # group 0: x 1, 2, 3 with r 0.2, 0.6, 0.4 -> pools 2 and 3 (0.5); shrunk with the prior 0.5:
    # (0.2 + 0.5)/2 and (1.0 + 0.5)/3; group 2: x 1, 5 with r 0.1, 0.9 -> (0.1 + 0.5)/2, (0.9 + 0.5)/2
    np.testing.assert_allclose(fit(np.array([0.2, 0.6, 0.4, 0.1, 0.9]), 0.5), [0.35, 0.5, 0.5, 0.3, 0.7])
    got = fit.at(np.array([0.5, 1.0, 1.5, 2.0, 9.0, 4.9, 5.0, 3.0]), np.array([0, 0, 0, 0, 0, 2, 2, 1]))
    # below the fitted x: the first rate; between: the rate of the x below; a group never fitted: NaN
    np.testing.assert_allclose(got, [0.35, 0.35, 0.35, 0.5, 0.5, 0.3, 0.7, np.nan])


def mixture(n, rng):
    """Stage 1's own model with a known truth: P(clean | rank) falls with rank, the cell and the
    probability on the label depend on clean/noisy, two sources (a tenth of the second without a rank)."""
    sources = np.where(rng.random(n) < 0.5, "google", "flickr")
    ranks = rng.integers(1, 201, size=n).astype(float)
    ranks[(sources == "flickr") & (rng.random(n) < 0.1)] = np.nan
    clean = rng.random(n) < 0.9 - 0.6 * np.nan_to_num(ranks, nan=100) / 200
    top_is_label = np.where(clean, rng.random(n) < 0.7, rng.random(n) < 0.05)
    labels = np.zeros(n, dtype=np.int64)
    # a clean image never has its top-1 on the label's neighbour with the label absent ([1, 2]): the
    # anchor that identifies the mixture (test_weighting_stage1.mixture)
    other = np.where(clean | (rng.random(n) < 0.5), 1, 0)[:, None]
    classes = np.where(top_is_label[:, None], [[0, 1]], np.where(other == 1, [[2, 0]], [[1, 2]]))
    p_top = np.round(np.where(clean, rng.uniform(0.4, 1.0, n), rng.uniform(0.2, 0.8, n)), 3)
    probs = np.stack([p_top, (1 - p_top) / 2], axis=1)
    neighbors = np.array([[1], [0], [-1]])
    return labels, sources, ranks, classes, probs, neighbors, clean


def test_stage1_on_a_sample_weights_every_image(monkeypatch):
    rng = np.random.default_rng(7)
    labels, sources, ranks, classes, probs, neighbors, clean = mixture(40_000, rng)
    whole = stage1_weights(labels, sources, ranks, classes, probs, neighbors)
    monkeypatch.setattr(stage1, "EM_SAMPLE", 8_000)
    details = {}
    sampled = stage1_weights(labels, sources, ranks, classes, probs, neighbors, details=details)
    assert details["em_images"] == 8_000 and details["em_converged"]
    # the sample's own images get exactly what EM gives when fitted on them alone
    rows = stage1.em_sample(len(labels))
    alone = stage1_weights(labels[rows], sources[rows], ranks[rows], classes[rows], probs[rows], neighbors)
    np.testing.assert_array_equal(sampled[rows], alone)
    # every image: as good as fitting all of them, against the truth
    assert abs(roc_auc(sampled, clean) - roc_auc(whole, clean)) < 0.005, (roc_auc(sampled, clean), roc_auc(whole, clean))
    assert abs(sampled.mean() - whole.mean()) < 0.03 and np.mean(np.abs(sampled - whole)) < 0.03
    assert np.all((sampled > 0) & (sampled < 1))
