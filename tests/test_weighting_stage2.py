"""Stage 2's pieces on hand-computed cases: the text margin, the query-word rule, IDF bags."""
import math

import numpy as np

from megaclass.weighting.keywords import KeywordExtractor
from megaclass.weighting.stage1 import Stage1Config, knn_arrays
from megaclass.weighting.stage2 import Stage2Config, image_keywords, stage2_weights, text_margin, text_vectors
from megaclass.weighting.text import KeywordEmbeddings, inverse_document_frequency, select_vocabulary


def test_text_margin_by_hand():
    classes = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.6, 0.8]])
    labels = np.array([0, 0, 1, 2])
    preds = np.array([[1, 2], [0, 1], [0, 2], [2, -1]])
    # image 0: cos(label 0) = 1, best other of {1: 0, 2: 0.6} = 0.6 -> 0.4
    # image 1: cos(label 0) = 0, other {1: 1} (0 is the label itself) -> -1
    # image 2: no text -> 0;  image 3: no alternative to its label -> 0
    np.testing.assert_allclose(text_margin(images, labels, preds, classes), [0.4, -1.0, 0.0, 0.0])


def test_stage2_adds_capped_text_evidence_to_stage1():
    neighbors, scores = knn_arrays(["n00000001", "n00000002"], {"n00000001": [("n00000002", 0.5)]})
    labels, sources, ranks = np.array([0, 0, 1]), ["google"] * 3, [1, 2, 3]
    preds, probs = np.array([[0, 1], [1, 0], [1, 0]]), np.array([[0.8, 0.2], [0.7, 0.3], [0.9, 0.1]])
    classes = np.array([[1.0, 0.0], [0.0, 1.0]])
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    # Stage 1 by hand. Agreement a: image 0: 0.8·1 (label) + 0.2·0.5 (KNN neighbour 1) = 0.9; image 1:
    # 0.7·0.5 + 0.3·1 = 0.65; image 2: 0.9·1 + 0.1·0 (class 1 has no neighbours) = 0.9. With one rank
    # bin, π = ā for every image, so w1 = σ(logit ā + logit a − logit ā) = a.
    w1 = [0.9, 0.65, 0.9]
    margins = [1.0, -1.0, 0.6 - 0.8]
    expected = [1 / (1 + math.exp(-(math.log(w / (1 - w)) + max(-4.0, min(4.0, m / 0.1)))))
                for w, m in zip(w1, margins)]  # text evidence +4 (capped), −4 (capped), −2
    got = stage2_weights(labels, sources, ranks, preds, probs, neighbors, scores, images, classes,
                         Stage2Config(tau=0.1, max_evidence=4.0), Stage1Config(rank_bins=1))
    np.testing.assert_allclose(got, expected, rtol=1e-9)


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
