"""Vectorized Wu-Palmer against NLTK, blockwise top-k against a dense float64 reference, knn.tsv I/O."""
import random

import numpy as np
import pytest
import torch

from megaclass.semantics import (
    KnnFileError,
    WuPalmer,
    combined_knn,
    embedding_knn,
    imagenet1k_wnids,
    read_knn_tsv,
    synset_of,
    topk_blockwise,
    write_knn_tsv,
)


@pytest.fixture(scope="module")
def ilsvrc():
    wnids = imagenet1k_wnids()
    return wnids, [synset_of(w) for w in wnids], WuPalmer(wnids)


def test_wup_equals_nltk_where_the_hierarchy_is_a_tree(ilsvrc):
    wnids, synsets, wup = ilsvrc
    scores = torch.cat([wup.block(slice(r, r + 300)) for r in range(0, len(wnids), 300)]).numpy()
    tree = [i for i, s in enumerate(synsets) if len(s.hypernym_paths()) == 1]
    rng = random.Random(0)
    pairs = [(rng.choice(tree), rng.choice(tree)) for _ in range(1500)]
    reference = np.array([synsets[i].wup_similarity(synsets[j]) for i, j in pairs])
    assert np.abs(scores[tuple(np.array(pairs).T)] - reference).max() < 1e-6
    np.testing.assert_array_equal(scores, scores.T)
    np.testing.assert_array_equal(np.diag(scores), 1.0)


def test_wup_with_multiple_inheritance_matches_the_documented_formula(ilsvrc):
    # 2 * depth(lcs) / (depth(a) + depth(b)); depth = max_depth + 1; lcs = deepest common hypernym.
    wnids, synsets, wup = ilsvrc
    multi = [i for i, s in enumerate(synsets) if len(s.hypernym_paths()) > 1]
    assert len(multi) > 100
    rows = multi[:40]
    for i in rows:
        got = wup.block(slice(i, i + 1))[0].double().numpy()
        a = synsets[i]
        for j in range(0, len(wnids), 7):
            b = synsets[j]
            lcs = max(x.max_depth() for x in a.common_hypernyms(b)) + 1
            assert got[j] == pytest.approx(2 * lcs / (a.max_depth() + b.max_depth() + 2), abs=1e-6)


def dense_topk(scores: np.ndarray, k: int):
    scores = scores.copy()
    np.fill_diagonal(scores, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(scores)), scores.shape), -scores), axis=1)[:, :k]
    return order, np.take_along_axis(scores, order, 1)


@pytest.mark.parametrize("n, k, block", [(300, 7, 64), (130, 129, 50), (97, 1, 200), (64, 5, 64)])
def test_blockwise_topk_matches_dense_float64(n, k, block):
    gen = torch.Generator().manual_seed(n)
    emb = torch.nn.functional.normalize(torch.randn(n, 16, generator=gen, dtype=torch.float64), dim=1)
    ref_idx, ref_val = dense_topk((emb @ emb.T).numpy(), k)
    idx, val = embedding_knn(emb.float(), k, block_size=block)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(val.numpy(), ref_val, atol=1e-5)


def test_blockwise_topk_with_many_exact_ties_keeps_the_best_values():
    # 5 distinct vectors repeated: ties everywhere, also at the cut, where any tied index is right.
    gen = torch.Generator().manual_seed(5)
    base = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen, dtype=torch.float64), dim=1)
    emb = base[torch.arange(203) % 5]
    _, ref_val = dense_topk((emb @ emb.T).numpy(), 45)
    idx, val = embedding_knn(emb.float(), 45, block_size=32)
    np.testing.assert_allclose(val.numpy(), ref_val, atol=1e-5)
    assert not (idx.numpy() == np.arange(203)[:, None]).any()
    assert all(len(set(row)) == 45 for row in idx.tolist())


def test_blockwise_topk_orders_equal_scores_by_index():
    scores = torch.tensor([[0, 1, 1, 1, 1], [1, 0, 2, 2, 1], [1, 2, 0, 2, 1], [1, 2, 2, 0, 1], [1, 1, 1, 1, 0]],
                          dtype=torch.float32)
    idx, val = topk_blockwise(lambda r, c: scores[r, c].clone(), 5, 2, block_size=2)
    assert idx[1:4].tolist() == [[2, 3], [1, 3], [1, 2]]  # rows 0 and 4 tie at the cut: either is right
    assert val.tolist() == [[1, 1], [2, 2], [2, 2], [2, 2], [1, 1]]


def test_topk_rejects_k_out_of_range():
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
        embedding_knn(torch.eye(4), 4)


def test_combined_knn_matches_dense_reference(ilsvrc):
    wnids, _, wup = ilsvrc
    n = 150
    sub = WuPalmer(wnids[:n])
    gen = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(n, 32, generator=gen, dtype=torch.float64), dim=1)
    alpha = 0.3
    reference = alpha * wup.block(slice(0, n))[:, :n].double() + (1 - alpha) * emb @ emb.T
    ref_idx, ref_val = dense_topk(reference.numpy(), 6)
    idx, val = combined_knn(sub, emb.float(), 6, alpha, block_size=40)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(val.numpy(), ref_val, atol=1e-5)


def test_knn_tsv_round_trip(tmp_path):
    wnids = ["n01440764", "n01443537", "n02123045"]
    path = tmp_path / "knn.tsv"
    write_knn_tsv(path, wnids, np.array([[1, 2], [0, 2], [1, 0]]), np.array([[0.9, 0.5], [0.9, 0.25], [0.5, 0.125]]))
    assert path.read_text().splitlines()[:2] == ["n01440764\tn01443537\t0.900000", "n01440764\tn02123045\t0.500000"]
    assert read_knn_tsv(path) == {"n01440764": [("n01443537", 0.9), ("n02123045", 0.5)],
                                  "n01443537": [("n01440764", 0.9), ("n02123045", 0.25)],
                                  "n02123045": [("n01443537", 0.5), ("n01440764", 0.125)]}


@pytest.mark.parametrize("row, message", [
    ("n01440764\tn01443537", "expected 3 tab-separated fields"),
    ("n01440764 n01443537 0.5", "expected 3 tab-separated fields"),
    ("n01440764\ttench\t0.5", "'tench' is not a wnid"),
    ("n01440764\tn01443537\thigh", "score 'high' is not a number"),
    ("n01440764\tn01443537\tnan", "score 'nan' is not finite"),
    ("n01440764\tn01440764\t1.0", "n01440764 is listed as its own neighbour"),
    ("n02123045\tn01440764\t0.1", "pair n02123045 -> n01440764 repeated"),
])
def test_read_knn_tsv_names_file_and_line(tmp_path, row, message):
    path = tmp_path / "knn.tsv"
    path.write_text(f"n02123045\tn01440764\t0.1\n\n{row}\n")
    with pytest.raises(KnnFileError) as info:
        read_knn_tsv(path)
    assert str(info.value).startswith(f"{path}:3: ") and message in str(info.value)


def test_read_knn_tsv_empty_or_missing(tmp_path):
    (tmp_path / "empty.tsv").write_text("\n")
    with pytest.raises(KnnFileError, match="has no rows"):
        read_knn_tsv(tmp_path / "empty.tsv")
    with pytest.raises(KnnFileError, match="cannot read"):
        read_knn_tsv(tmp_path / "absent.tsv")
