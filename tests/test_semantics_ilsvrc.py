"""K nearest categories of the 1,000 ILSVRC classes with the shipped MiniLM (encoded once per module)."""
import numpy as np
import pytest

from megaclass.cli import main
from megaclass.semantics import (
    DEFAULT_ALPHA,
    TextEncoder,
    class_embeddings,
    imagenet1k_wnids,
    nearest_categories,
    read_knn_tsv,
    synset_of,
    timm_info_dir,
)

K = 10
TABBY, TIGER_CAT = "n02123045", "n02123159"
CRANE_BIRD, CRANE_MACHINE = "n02012849", "n03126707"


class FailingEncoder:
    """Has the real encoder's cache identity; fails if asked to encode anything."""

    def __init__(self):
        self.identity = TextEncoder().identity

    def encode(self, texts, progress=False):
        raise AssertionError(f"the encoder ran on {len(texts)} texts; the cache should have served them")


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory):
    cache = tmp_path_factory.mktemp("semantics-cache")
    wnids = imagenet1k_wnids()
    neighbors, scores = nearest_categories(wnids, K, cache_dir=cache)
    return wnids, neighbors, scores, cache


def neighbours_of(ilsvrc, wnid):
    wnids, neighbors, _, _ = ilsvrc
    return [wnids[j] for j in neighbors[wnids.index(wnid)]]


def test_tiger_cat_is_among_tabbys_neighbours(ilsvrc):
    assert TIGER_CAT in neighbours_of(ilsvrc, TABBY)[:5]
    assert TABBY in neighbours_of(ilsvrc, TIGER_CAT)[:5]


def test_the_two_cranes_are_not_each_others_neighbours(ilsvrc):
    assert CRANE_MACHINE not in neighbours_of(ilsvrc, CRANE_BIRD)
    assert CRANE_BIRD not in neighbours_of(ilsvrc, CRANE_MACHINE)


def test_shape_order_and_self_exclusion(ilsvrc):
    wnids, neighbors, scores, _ = ilsvrc
    assert neighbors.shape == scores.shape == (1000, K)
    assert not (neighbors == np.arange(1000)[:, None]).any()
    assert all(len(set(row)) == K for row in neighbors.tolist())
    assert (np.diff(scores, axis=1) <= 0).all()


def test_rows_match_an_independent_float64_reference(ilsvrc):
    # Wu-Palmer from NLTK's own hypernym sets and depths, cosine in float64, a dense sort.
    wnids, neighbors, scores, cache = ilsvrc
    emb = class_embeddings(wnids, FailingEncoder(), cache).astype(np.float64)
    synsets = [synset_of(w) for w in wnids]
    for wnid in (TABBY, CRANE_BIRD, CRANE_MACHINE, "n01440764"):
        i = wnids.index(wnid)
        a = synsets[i]
        wup = np.array([2 * (max(x.max_depth() for x in a.common_hypernyms(b)) + 1)
                        / (a.max_depth() + b.max_depth() + 2) for b in synsets])
        reference = DEFAULT_ALPHA * wup + (1 - DEFAULT_ALPHA) * emb @ emb[i]
        reference[i] = -np.inf
        order = np.argsort(-reference, kind="stable")[:K]
        assert neighbors[i].tolist() == order.tolist()
        np.testing.assert_allclose(scores[i], reference[order], atol=1e-5)


def test_second_run_reuses_the_cache_and_never_encodes(ilsvrc):
    wnids, neighbors, scores, cache = ilsvrc
    again = nearest_categories(wnids, K, encoder=FailingEncoder(), cache_dir=cache)
    np.testing.assert_array_equal(again[0], neighbors)
    np.testing.assert_array_equal(again[1], scores)
    # Other k: neighbours recomputed from the cached embeddings, still no encoding.
    fewer, fewer_scores = nearest_categories(wnids, 3, encoder=FailingEncoder(), cache_dir=cache)
    np.testing.assert_array_equal(fewer, neighbors[:, :3])
    np.testing.assert_allclose(fewer_scores, scores[:, :3], atol=1e-6)
    # Other class texts are other inputs: the cache must not answer for them.
    with pytest.raises(AssertionError, match="the encoder ran on 1000 texts"):
        nearest_categories(wnids, K, encoder=FailingEncoder(), cache_dir=cache, names=["x"] * 1000)


def test_cli_writes_knn_tsv_from_the_cache(ilsvrc, tmp_path, monkeypatch):
    wnids, neighbors, scores, cache = ilsvrc
    monkeypatch.setattr(TextEncoder, "encode", FailingEncoder.encode)
    synsets = timm_info_dir() / "imagenet_synsets.txt"
    code = main(["semantics", "--synsets", str(synsets), "--k", str(K), "--out", str(tmp_path),
                 "--cache", str(cache), "--quiet"])
    assert code == 0
    table = read_knn_tsv(tmp_path / "knn.tsv")
    assert list(table) == wnids
    for i, wnid in enumerate(wnids):
        assert [n for n, _ in table[wnid]] == [wnids[j] for j in neighbors[i]]
        np.testing.assert_allclose([s for _, s in table[wnid]], scores[i], atol=1e-6)


def test_cli_on_a_webvision_style_file_then_cached(tmp_path, monkeypatch, capsys):
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("n01440764 tench, Tinca tinca\n\nn01443537 goldfish, Carassius auratus\n"
                       "n02123045 tabby, tabby cat\nn02123159 tiger cat\nn02012849 crane\nn03126707 crane\n")
    args = ["semantics", "--synsets", str(synsets), "--k", "2", "--out", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 0
    first = (tmp_path / "out" / "knn.tsv").read_text()
    table = read_knn_tsv(tmp_path / "out" / "knn.tsv")
    assert [n for n, _ in table["n02123045"]][0] == "n02123159" and "n03126707" not in dict(table["n02012849"])
    assert all(len(rows) == 2 for rows in table.values()) and len(table) == 6
    monkeypatch.setattr(TextEncoder, "encode", FailingEncoder.encode)
    assert main(args) == 0
    assert (tmp_path / "out" / "knn.tsv").read_text() == first
    synsets.write_text("n01440764\nn00000001\nn02123045\nn00000002\n")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{synsets}:2: n00000001" in err and f"{synsets}:4: n00000002" in err and "Traceback" not in err
