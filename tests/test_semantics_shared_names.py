"""Neighbours by meaning, not by a shared word: senses that share a name are not each other's nearest
categories unless WordNet relates them (wup ≥ 1/2); related senses still are. Pairs from the 1,000
ILSVRC classes and from ImageNet-22k (timm's lists), checked in both directions."""
import numpy as np
import pytest

from megaclass.semantics import imagenet22k_wnids, nearest_categories
from megaclass.semantics.knn import RELATED_WUP, shared_name_pairs
from megaclass.semantics.synsets import imagenet1k_wnids
from megaclass.semantics.wordnet import synset_of

UNRELATED = [("n02012849", "n03126707", "crane: the bird, the machine"),
             ("n02113186", "n02963159", "Cardigan: the corgi, the sweater"),
             ("n02879718", "n02883205", "bow the weapon, bow tie"),
             ("n01694955", "n03782190", "African monitor (lizard), monitor (display)"),
             ("n02537525", "n09403427", "rainbow trout, rainbow")]
RELATED = [("n02509815", "n02510455", "lesser panda, giant panda"),
           ("n02125311", "n02127052", "cougar, lynx: both 'catamount'"),
           ("n02627835", "n02629230", "two bonitos"),
           ("n02223266", "n02225798", "termite, powder-post termite")]
ILSVRC = {"n02012849", "n03126707", "n02113186", "n02963159", "n02879718", "n02883205", "n02509815", "n02510455",
          "n02125311", "n02127052"}


def test_shared_name_pairs_by_hand():
    names = [["crane"], ["crane", "derrick"], ["bow"], ["bow tie", "bowtie"], ["rainbow trout"], ["trout"], ["tie"]]
    # crane = crane; bow is a word of "bow tie"; trout a word of "rainbow trout"; tie a word of "bow tie"
    assert shared_name_pairs(names).tolist() == [[0, 1], [2, 3], [3, 6], [4, 5]]


def test_the_pairs_are_what_they_claim():
    one_k, twenty_two_k = set(imagenet1k_wnids()), set(imagenet22k_wnids())
    for a, b, _ in UNRELATED + RELATED:
        assert a in twenty_two_k and b in twenty_two_k
        assert (a in one_k and b in one_k) == (a in ILSVRC)
        wup = synset_of(a).wup_similarity(synset_of(b))  # NLTK's own Wu-Palmer
        assert (wup >= RELATED_WUP) == ((a, b) in [(x, y) for x, y, _ in RELATED]), (a, b, wup)


@pytest.fixture(scope="module")
def neighbours():
    rng = np.random.default_rng(0)
    pool = sorted(set(imagenet22k_wnids()) - {w for p in UNRELATED + RELATED for w in p[:2]})
    wnids = sorted({w for p in UNRELATED + RELATED for w in p[:2]} | set(rng.choice(pool, 200, replace=False).tolist()))
    idx, _ = nearest_categories(wnids, k=5)
    return {w: {wnids[j] for j in row} for w, row in zip(wnids, idx.tolist())}


@pytest.mark.parametrize("a,b,what", UNRELATED)
def test_senses_that_only_share_a_name_are_not_neighbours(neighbours, a, b, what):
    assert b not in neighbours[a] and a not in neighbours[b], what


@pytest.mark.parametrize("a,b,what", RELATED)
def test_related_senses_that_share_a_name_still_are(neighbours, a, b, what):
    assert b in neighbours[a] and a in neighbours[b], what


def test_on_the_1000_ilsvrc_classes():
    wnids = imagenet1k_wnids()
    idx, scores = nearest_categories(wnids, k=5)
    near = {w: {wnids[j] for j in row} for w, row in zip(wnids, idx.tolist())}
    for a, b, what in UNRELATED[:3]:
        assert b not in near[a] and a not in near[b], what
    for a, b, what in RELATED[:2]:
        assert b in near[a] and a in near[b], what
    assert np.isfinite(scores).all()
