"""roc_auc against hand-counted pairs and an independent O(n²) count."""
import numpy as np

from megaclass.weighting.metrics import roc_auc


def test_hand_example():
    # positives 0.9, 0.4, 0.4; negatives 0.4, 0.1. Pairs (pos > neg): 0.9>0.4, 0.9>0.1, 0.4>0.1 (×2) = 4,
    # ties 0.4=0.4 (×2) count 1/2 each = 1; total 5 of 3·2 = 6 pairs.
    assert roc_auc([0.9, 0.4, 0.4, 0.4, 0.1], [True, True, True, False, False]) == 5 / 6


def test_against_pair_count():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 7, size=300).astype(float)  # many ties
    positive = rng.random(300) < 0.4
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert abs(roc_auc(scores, positive) - pairs / (len(pos) * len(neg))) < 1e-12


def test_degenerate():
    assert roc_auc([1, 2, 3], [False, False, False]) != roc_auc([1, 2, 3], [False, False, False])  # NaN
    assert roc_auc([1, 2], [False, True]) == 1.0 and roc_auc([2, 1], [False, True]) == 0.0
