"""Stage 2's pieces on hand-computed cases: the text margin, the query-word rule, IDF bags."""
import math

import numpy as np
import pytest

from megaclass.weighting.keywords import KeywordExtractor
from megaclass.weighting.metrics import roc_auc
from megaclass.weighting.stage2 import image_keywords, stage2_weights, text_margin, text_vectors
from megaclass.weighting.text import KeywordEmbeddings, inverse_document_frequency, select_vocabulary


def test_text_margin_by_hand():
    classes = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.6, 0.8]])
    labels = np.array([0, 0, 1, 2])
    preds = np.array([[1, 2], [0, 1], [0, 2], [2, -1]])
    # image 0: cos(label 0) = 1, best other of {1: 0, 2: 0.6} = 0.6 -> 0.4
    # image 1: cos(label 0) = 0, other {1: 1} (0 is the label itself) -> -1
    # image 2: no text -> none (NaN);  image 3: no alternative to its label -> none
    np.testing.assert_allclose(text_margin(images, labels, preds, classes), [0.4, -1.0, np.nan, np.nan])


def text_case(n, rng):
    """Stage-1 weights and pages from a known truth: a clean page describes the label (margin around
    +0.2), a noisy one another class (around -0.2), a quarter of the pages say nothing."""
    clean = rng.random(n) < 0.6
    w1 = 1 / (1 + np.exp(-(np.where(clean, 1.0, -1.0) + rng.normal(0, 1.5, n))))
    angle = np.where(clean, 0.2, -0.2) + rng.normal(0, 0.15, n)
    # 2-d text vectors: cos to class 0 (the label) minus cos to class 1 (the alternative) is the margin
    theta = np.pi / 4 - np.arcsin(np.clip(angle / np.sqrt(2), -1, 1))
    images = np.stack([np.cos(theta), np.sin(theta)], 1)
    silent = rng.random(n) < 0.25
    images[silent] = 0
    classes = np.array([[1.0, 0.0], [0.0, 1.0]])
    preds = np.tile([1, 0], (n, 1))
    return clean, w1, images, classes, preds, silent


def test_a_page_that_says_nothing_keeps_its_stage1_weight_and_text_adds_evidence():
    rng = np.random.default_rng(0)
    clean, w1, images, classes, preds, silent = text_case(6000, rng)
    labels = np.zeros(len(w1), dtype=np.int64)
    np.testing.assert_allclose(text_margin(images, labels, preds, classes)[~silent][:3],
                               (images[~silent, 0] - images[~silent, 1])[:3], atol=1e-12)
    details = {}
    s = stage2_weights(w1, labels, preds, images, classes, details)
    assert np.array_equal(s[silent], w1[silent])  # exactly, not approximately
    assert abs(details["pages_with_margin"] - (~silent).mean()) < 1e-12
    # the larger the margin, the higher the weight at equal stage-1 weight
    margin = images[:, 0] - images[:, 1]
    logit_gain = np.log(s / (1 - s)) - np.log(w1 / (1 - w1))
    order = np.argsort(margin[~silent])
    assert np.all(np.diff(logit_gain[~silent][order]) >= -1e-9)
    speaking = ~silent
    assert roc_auc(s[speaking], clean[speaking]) > roc_auc(w1[speaking], clean[speaking]) + 0.05
    assert roc_auc(s[silent], clean[silent]) == roc_auc(w1[silent], clean[silent])


def test_stage2_rejects_weights_that_are_not_posteriors():
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        stage2_weights(np.array([0.5, 1.0]), np.zeros(2, dtype=np.int64), np.array([[1], [1]]), np.ones((2, 2)),
                       np.ones((2, 2)))


def test_query_words_are_removed():
    extract = KeywordExtractor()
    kw = image_keywords(extract, ["Crane lifting steel beams", "crane"], ["", "IMG_1.JPG"], ["cranes", ""],
                        ["crane", "crane"])
    assert kw == [["lifting", "steel", "beam"], []]


def test_idf_bags_match_a_direct_computation():
    embeddings = KeywordEmbeddings()
    lists = [["heron", "marsh"], ["heron"], ["steel", "heron"]]
    idf, unseen = inverse_document_frequency(lists)
    assert math.isclose(idf["heron"], math.log(4 / 4) + 1) and math.isclose(idf["marsh"], math.log(4 / 2) + 1)
    bags = embeddings.bags(lists + [[]], idf, unseen)
    words = embeddings.encoder.encode(["heron", "marsh", "steel"])
    vec = dict(zip(["heron", "marsh", "steel"], words.astype(np.float64)))
    for row, ks in zip(bags, lists):
        direct = sum(idf[k] * vec[k] for k in ks)
        np.testing.assert_allclose(row, direct / np.linalg.norm(direct), atol=1e-5)
    assert not bags[3].any()
    assert select_vocabulary(lists, min_df=1, max_vocabulary=2) == {"heron", "marsh"}  # df 3, then a tie → a-z
    assert select_vocabulary(lists, min_df=2) == {"heron"}
    image_vectors, _ = text_vectors(lists, [["bird"]], embeddings, min_df=2)  # only "heron" is on ≥ 2 images
    np.testing.assert_allclose(image_vectors[0], vec["heron"] / np.linalg.norm(vec["heron"]), atol=1e-5)


def test_chunked_text_margins_equal_a_float64_reference():
    """`text_margins` in chunks of 7 (41 images: the last chunk short) = the margin computed here in
    float64 from the encoder's word vectors, with IDF and the min_df rule by hand."""
    from megaclass.weighting.stage2 import text_margins
    from megaclass.weighting.text import KeywordBags

    rng = np.random.default_rng(3)
    vocabulary = ["heron", "marsh", "steel", "beam", "crane", "tower", "river", "feather"]
    lists = [list(dict.fromkeys(rng.choice(vocabulary, size=rng.integers(0, 5)).tolist())) for _ in range(41)]
    lists[5] = ["lonely"]  # on one image only: dropped by min_df=2, so image 5 says nothing
    class_kw = [["bird", "heron"], ["machine", "crane", "steel"], ["water", "river"], ["tower"]]
    labels = rng.integers(0, 4, size=41)
    preds = rng.integers(-1, 4, size=(41, 3))
    preds[0] = [labels[0], -1, -1]  # no alternative to the label
    embeddings = KeywordEmbeddings()
    got = text_margins(KeywordBags.of(lists), class_kw, labels, preds, embeddings, min_df=2, chunk=7)

    words = sorted({w for ks in lists for w in ks} | {w for ks in class_kw for w in ks})
    vec = dict(zip(words, embeddings.encoder.encode(words).astype(np.float64)))
    df = {w: sum(w in ks for ks in lists) for w in words}
    idf = {w: math.log(42 / (1 + df[w])) + 1 for w in words if df[w] >= 2}
    unseen = math.log(42) + 1

    def feature(ks):  # IDF-weighted mean, normalised; None without a word
        if not ks:
            return None
        v = sum(idf.get(k, unseen) * vec[k] for k in ks)
        return v / np.linalg.norm(v)

    classes = [feature(ks) for ks in class_kw]
    for i, ks in enumerate(lists):
        t = feature([k for k in ks if k in idf])  # the image's words below min_df are left out
        others = [int(c) for c in preds[i] if c >= 0 and c != labels[i]]
        if t is None or not others:
            assert np.isnan(got[i]), i
        else:
            want = t @ classes[labels[i]] - max(t @ classes[c] for c in others)
            assert got[i] == pytest.approx(want, abs=1e-5), i
    assert np.isnan(got[0]) and np.isnan(got[5])


def test_keyword_bags_keep_drops_words_and_keeps_empty_bags():
    """`keep` against lists filtered by hand: empty bags first, inside and last, a bag emptied by the mask."""
    from megaclass.weighting.text import KeywordBags

    lists = [[], ["crane", "bird"], [], ["lift"], ["bird", "marsh", "crane"], []]
    bags = KeywordBags.of(lists)
    drop = {"crane", "lift"}
    kept = bags.keep(np.array([w not in drop for w in bags.words]))
    assert kept.tolist() == [[w for w in ws if w not in drop] for ws in lists]
    assert kept.offsets.tolist() == [0, 0, 1, 1, 1, 3, 3] and kept.words == bags.words
    none = KeywordBags.of([[], []]).keep(np.zeros(0, dtype=bool))
    assert none.tolist() == [[], []] and KeywordBags.of([]).keep(np.zeros(0, dtype=bool)).tolist() == []
