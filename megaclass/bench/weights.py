"""`megaclass bench weights`: keywords + stage-2 scores throughput toward 1,000,000 images.

Web-like metadata is generated for N images over C real WordNet classes (ImageNet-22k synsets): each
title, description and tag list mixes words of the image's class text with words drawn from the whole
WordNet noun vocabulary with Zipf frequencies (so the keyword vocabulary grows with N as a web
corpus's does), plus URLs, file names, digits and HTML entities. Timed phases: keyword extraction,
encoding each unique keyword once (MiniLM), IDF-weighted bags, and the stage-2 formula against
random top-k predictions. Target: 1M images in at most 10 minutes on 2 cores. With N < 1M the
1M figure is a linear extrapolation, an upper bound because the encoder's work grows with the
vocabulary, which grows sublinearly with N.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

TARGET_IMAGES = 1_000_000
TARGET_SECONDS = 600


def register(subparsers) -> None:
    parser = subparsers.add_parser("weights", help="keywords + stage-2 scores throughput",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=TARGET_IMAGES, help="images N (default 1000000)")
    parser.add_argument("--classes", type=int, default=5000, help="classes C (default 5000, WebVision 2.0's)")
    parser.add_argument("--k", type=int, default=5, help="predictions per image (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.json", help="also write the results here")
    parser.set_defaults(func=run)


def _metadata(n: int, class_words: list[list[str]], vocabulary: list[str], labels: np.ndarray, rng):
    """Titles, descriptions, tags and queries of n images (not timed)."""
    zipf = np.minimum(rng.zipf(1.3, size=n * 10), len(vocabulary)) - 1
    noise = rng.integers(0, 10_000, size=n)
    titles, descriptions, tags, queries = [], [], [], []
    for i in range(n):
        own = class_words[labels[i]]
        picks = [own[j] for j in rng.integers(0, len(own), size=3)]
        common = [vocabulary[j] for j in zipf[i * 10:(i + 1) * 10]]
        titles.append(f"{picks[0]} {common[0]} {common[1]} IMG_{noise[i]}.JPG")
        descriptions.append(f"{' '.join(common[2:7])} {picks[1]} &amp; http://example.com/{noise[i]}.html")
        tags.append(" ".join([picks[2]] + common[7:]) if i % 2 else "")
        queries.append(own[0])
    return titles, descriptions, tags, queries


def run(args) -> int:
    from megaclass.semantics import imagenet22k_wnids
    from megaclass.semantics.wordnet import wordnet
    from megaclass.weighting.keywords import KeywordExtractor
    from megaclass.weighting.stage2 import Stage2Config, class_descriptions, image_keywords, text_margin, text_vectors
    from megaclass.weighting.text import KeywordEmbeddings

    rng = np.random.default_rng(args.seed)
    wnids = sorted(rng.choice(imagenet22k_wnids(), size=args.classes, replace=False).tolist())
    synsets = [(w, "") for w in wnids]
    texts = class_descriptions(synsets)
    class_words = [[w for w in t.replace(",", " ").replace(":", " ").replace(";", " ").split() if w.isalpha()] or ["thing"]
                   for t in texts]
    vocabulary = sorted({name.replace("_", " ") for name in wordnet().all_lemma_names("n") if name.isalpha()})
    rng.shuffle(vocabulary)
    labels = rng.integers(0, args.classes, size=args.images)
    print(f"generating metadata for {args.images} images over {args.classes} classes "
          f"(vocabulary {len(vocabulary)} words) ...", flush=True)
    titles, descriptions, tags, queries = _metadata(args.images, class_words, vocabulary, labels, rng)
    pred = rng.integers(0, args.classes, size=(args.images, args.k))

    times = {}
    start = time.perf_counter()
    extractor = KeywordExtractor()
    image_kw = image_keywords(extractor, titles, descriptions, tags, queries)
    class_kw = [extractor(t) for t in texts]
    times["keywords_s"] = time.perf_counter() - start

    start = time.perf_counter()
    embeddings = KeywordEmbeddings()
    image_vectors, class_vectors = text_vectors(image_kw, class_kw, embeddings, Stage2Config().min_df, progress=True)
    times["encode_and_bags_s"] = time.perf_counter() - start

    start = time.perf_counter()
    margin = text_margin(image_vectors, labels, pred, class_vectors)
    times["scores_s"] = time.perf_counter() - start

    total = sum(times.values())
    scale = TARGET_IMAGES / args.images
    result = {
        "images": args.images, "classes": args.classes, "k": args.k, "threads": torch.get_num_threads(),
        "unique_keywords": len(embeddings.cache),
        "mean_keywords_per_image": round(float(np.mean([len(k) for k in image_kw])), 2),
        **{k: round(v, 2) for k, v in times.items()},
        "total_s": round(total, 2),
        "images_per_s": round(args.images / total, 1),
        "seconds_for_1M": round(total * scale, 1),
        "seconds_for_1M_is": "measured" if scale == 1 else "linear extrapolation (upper bound)",
        "target_s_for_1M": TARGET_SECONDS,
        "meets_target": bool(total * scale <= TARGET_SECONDS),
        "margin_finite": bool(np.isfinite(margin).all()),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0
