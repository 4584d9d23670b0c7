"""`megaclass bench weights`: keywords + stage-2 scores throughput toward 1,000,000 images.

Web-like metadata is generated for N images over C real WordNet classes (ImageNet-22k synsets): each
title, description and tag list mixes words of the image's class text with words drawn from the whole
WordNet noun vocabulary with Zipf frequencies (so the keyword vocabulary grows with N as a web
corpus's does), plus URLs, file names, digits and HTML entities. Timed phases: keyword extraction,
encoding each unique keyword once (MiniLM), IDF-weighted bags, and stage 2 itself (the text margins
against random top-k predictions and their EM fit, from random stage-1 weights). Target: 1M images in at most 10 minutes on 2 cores. With N < 1M the
1M figure is extrapolated: the per-image phases linearly, the encoder's by the number of keywords
that Heaps' law (fitted to the vocabulary of the first N/8 … N images) predicts at 1M, capped at
`Stage2Config.max_vocabulary` as stage 2 caps it.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from megaclass.argtypes import nonnegative_int, output_file, output_folder, positive_int
from megaclass.io import atomic_write_text

TARGET_IMAGES = 1_000_000
TARGET_SECONDS = 600


def register(subparsers) -> None:
    parser = subparsers.add_parser("weights", help="keywords + stage-2 scores throughput",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=positive_int, default=TARGET_IMAGES, help="images N (default 1000000)")
    parser.add_argument("--classes", type=positive_int, default=5000, help="classes C (default 5000, WebVision 2.0's)")
    parser.add_argument("--k", type=positive_int, default=5, help="predictions per image (default 5)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the generated metadata (default 0)")
    parser.add_argument("--encoder-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="MiniLM precision (bfloat16: autocast, faster on CPUs with AVX512-BF16)")
    parser.add_argument("--out", type=output_file, default=None, metavar="FILE.json", help="also write the results here")
    parser.add_argument("--suite", type=output_folder, default=None, metavar="DIR",
                        help="instead of the throughput: stage 1 and 2 beside naive baselines on every noise model "
                             "of `megaclass synth --noise` (megaclass/bench/suite.py) -> DIR/suite.{json,md,png}")
    parser.add_argument("--suite-classes", type=positive_int, default=None, help="--suite: classes per data set (default synth's)")
    parser.add_argument("--suite-per-class", type=positive_int, default=None, help="--suite: images per class (default synth's)")
    parser.set_defaults(func=run)


def web_vocabulary(rng, classes: int):
    """(wnids, class texts, words of each class text, WordNet noun vocabulary shuffled) for generated
    metadata over `classes` random ImageNet-22k classes."""
    from megaclass.semantics import imagenet22k_wnids
    from megaclass.semantics.wordnet import wordnet
    from megaclass.weighting.stage2 import class_descriptions

    wnids = sorted(rng.choice(imagenet22k_wnids(), size=classes, replace=False).tolist())
    texts = class_descriptions([(w, "") for w in wnids])
    class_words = [[w for w in t.replace(",", " ").replace(":", " ").replace(";", " ").split() if w.isalpha()] or ["thing"]
                   for t in texts]
    vocabulary = sorted({name.replace("_", " ") for name in wordnet().all_lemma_names("n") if name.isalpha()})
    rng.shuffle(vocabulary)
    return wnids, texts, class_words, vocabulary


def _metadata(n: int, class_words: list[list[str]], vocabulary: list[str], labels: np.ndarray, rng,
              title_words: int = 2, description_words: int = 5, tag_words: int = 3):
    """Titles, descriptions, tags and queries of n images (not timed): each field one word of the
    class text plus `*_words` words drawn from `vocabulary` with Zipf frequencies, and web debris."""
    per = title_words + description_words + tag_words
    zipf = np.minimum(rng.zipf(1.3, size=n * per), len(vocabulary)) - 1
    noise = rng.integers(0, 10_000, size=n)
    titles, descriptions, tags, queries = [], [], [], []
    a, b = title_words, title_words + description_words
    for i in range(n):
        own = class_words[labels[i]]
        picks = [own[j] for j in rng.integers(0, len(own), size=3)]
        common = [vocabulary[j] for j in zipf[i * per:(i + 1) * per]]
        titles.append(f"{picks[0]} {' '.join(common[:a])} IMG_{noise[i]}.JPG")
        descriptions.append(f"{' '.join(common[a:b])} {picks[1]} &amp; http://example.com/{noise[i]}.html")
        tags.append(" ".join([picks[2]] + common[b:]) if i % 2 else "")
        queries.append(own[0])
    return titles, descriptions, tags, queries


def vocabulary_at(keyword_lists: list[list[str]], min_df: int, n_target: int) -> float:
    """Keywords on ≥ min_df images among n_target images, by Heaps' law V = K·n^β fitted to the
    vocabulary of the first N/8, N/4, N/2 and N images."""
    from megaclass.weighting.text import select_vocabulary

    sizes, vocab = [], []
    for part in (8, 4, 2, 1):
        n = len(keyword_lists) // part
        sizes.append(n), vocab.append(max(1, len(select_vocabulary(keyword_lists[:n], min_df))))
    beta, log_k = np.polyfit(np.log(sizes), np.log(vocab), 1)
    return float(np.exp(log_k) * n_target ** beta)


def run(args) -> int:
    if args.suite is not None:
        from dataclasses import replace

        from megaclass.bench.suite import markdown, run_suite
        from megaclass.data.synth import SynthConfig

        sizes = {k: v for k, v in (("classes", args.suite_classes), ("per_class", args.suite_per_class)) if v}
        table = run_suite(args.suite, replace(SynthConfig(seed=args.seed), **sizes))
        print(markdown(table))
        print(f"wrote {args.suite}/suite.json, suite.md, suite.png")
        return 0
    from megaclass.semantics import TextEncoder
    from megaclass.weighting.keywords import KeywordExtractor
    from megaclass.weighting.stage2 import Stage2Config, image_keywords, stage2_weights, text_vectors
    from megaclass.weighting.text import KeywordEmbeddings, select_vocabulary

    rng = np.random.default_rng(args.seed)
    _, texts, class_words, vocabulary = web_vocabulary(rng, args.classes)
    labels = rng.integers(0, args.classes, size=args.images)
    print(f"generating metadata for {args.images} images over {args.classes} classes "
          f"(vocabulary {len(vocabulary)} words) ...", flush=True)
    titles, descriptions, tags, queries = _metadata(args.images, class_words, vocabulary, labels, rng)
    pred = rng.integers(0, args.classes, size=(args.images, args.k))
    stage1 = rng.uniform(0.05, 0.95, size=args.images)  # stage 2 starts from the stage-1 posteriors

    cfg = Stage2Config()
    times, cpu = {}, {}
    start, cpu_start = time.perf_counter(), time.process_time()
    extractor = KeywordExtractor()
    image_kw = image_keywords(extractor, titles, descriptions, tags, queries)
    class_kw = [extractor(t) for t in texts]
    times["keywords_s"], cpu["keywords_s"] = time.perf_counter() - start, time.process_time() - cpu_start

    start, cpu_start = time.perf_counter(), time.process_time()
    embeddings = KeywordEmbeddings(TextEncoder(batch_size=512, max_length=16, dtype=args.encoder_dtype))
    chosen = select_vocabulary(image_kw, cfg.min_df, cfg.max_vocabulary)
    embeddings.add(list(chosen) + [k for ks in class_kw for k in ks], progress=True)
    times["encode_s"], cpu["encode_s"] = time.perf_counter() - start, time.process_time() - cpu_start

    start, cpu_start = time.perf_counter(), time.process_time()
    image_vectors, class_vectors = text_vectors(image_kw, class_kw, embeddings, cfg.min_df, cfg.max_vocabulary)
    times["bags_s"], cpu["bags_s"] = time.perf_counter() - start, time.process_time() - cpu_start

    start, cpu_start = time.perf_counter(), time.process_time()
    details = {}
    weights = stage2_weights(stage1, labels, pred, image_vectors, class_vectors, details)
    times["scores_s"], cpu["scores_s"] = time.perf_counter() - start, time.process_time() - cpu_start

    total = sum(times.values())
    scale = TARGET_IMAGES / args.images
    words = len(embeddings.cache)
    class_only = words - len(chosen)
    words_1m = words if scale == 1 else \
        min(vocabulary_at(image_kw, cfg.min_df, TARGET_IMAGES), cfg.max_vocabulary) + class_only

    def to_1m(seconds: dict) -> float:
        return (sum(seconds.values()) - seconds["encode_s"]) * scale + seconds["encode_s"] * words_1m / words

    estimate = to_1m(times)
    threads = torch.get_num_threads()
    # On a shared machine wall time overstates: CPU time spread over the threads a phase uses (the
    # encoder and the bags use torch's threads, keyword extraction and the margins one) is what an
    # idle machine would take.
    idle = {k: v / (threads if k in ("encode_s", "bags_s") else 1) for k, v in cpu.items()}
    result = {
        "images": args.images, "classes": args.classes, "k": args.k, "threads": threads,
        "encoder_dtype": args.encoder_dtype,
        "encoded_keywords": words,
        "mean_keywords_per_image": round(float(np.mean([len(k) for k in image_kw])), 2),
        **{k: round(v, 2) for k, v in times.items()},
        "encoder_keywords_per_s": round(words / times["encode_s"], 1),
        "total_s": round(total, 2),
        "images_per_s": round(args.images / total, 1),
        "encoded_keywords_for_1M": int(words_1m),
        "seconds_for_1M": round(estimate, 1),
        "seconds_for_1M_if_cores_idle": round(to_1m(idle), 1),
        "seconds_for_1M_is": "measured" if scale == 1 else
            "extrapolated: per-image phases linearly, encoding by the vocabulary Heaps' law predicts at 1M",
        "target_s_for_1M": TARGET_SECONDS,
        "meets_target": bool(estimate <= TARGET_SECONDS),
        "stage2_em_iterations": details["em_iterations"],
        "pages_with_margin": round(details["pages_with_margin"], 4),
        "weights_finite": bool(np.isfinite(weights).all()),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0
