"""`megaclass synth`: write the embedded synthetic WebVision-layout data set.
`megaclass shards`: convert a WebVision-layout data set into tar shards."""
from __future__ import annotations

import json
import sys

from megaclass.argtypes import nonnegative_int, output_folder, positive_int


def register(subparsers) -> None:
    from megaclass.data.synth import NOISE_MODELS, SynthConfig

    defaults = SynthConfig()
    parser = subparsers.add_parser(
        "synth", help="write the embedded synthetic WebVision-layout data set",
        description="Write a small data set in exactly the WebVision layout (info/, google/, flickr/, "
                    "val_images_256/) on real WordNet categories, with rank- and source-dependent label "
                    "noise, plus truth_train.tsv (each training image's true clean/noisy flag and class) "
                    "and synth.json (configuration and noise statistics).")
    parser.add_argument("--out", required=True, type=output_folder, help="output directory (created; must be empty or absent)")
    parser.add_argument("--classes", type=positive_int, default=defaults.classes,
                        help=f"number of categories (default {defaults.classes})")
    parser.add_argument("--per-class", type=positive_int, default=defaults.per_class,
                        help=f"mean training images per class, Google + Flickr (default {defaults.per_class})")
    parser.add_argument("--val-per-class", type=nonnegative_int, default=defaults.val_per_class,
                        help=f"clean validation images per class (default {defaults.val_per_class})")
    parser.add_argument("--image-size", type=positive_int, default=defaults.image_size,
                        help=f"image side in pixels (default {defaults.image_size})")
    parser.add_argument("--seed", type=nonnegative_int, default=defaults.seed, help="random seed; same seed, same data set")
    parser.add_argument("--noise", default=defaults.noise, choices=sorted(NOISE_MODELS),
                        help="noise model (default web): "  # argparse %-formats help: the texts' own % are doubled
                        + "; ".join(f"{k}: {v}" for k, v in NOISE_MODELS.items()).replace("%", "%%"))
    parser.set_defaults(func=_run)

    shards = subparsers.add_parser(
        "shards", help="convert a WebVision-layout data set into tar shards (jpg + json + cls, index.json)",
        description="Write DIR/train-NNNNNN.tar, DIR/val-NNNNNN.tar and DIR/index.json (last, atomically): each "
                    "sample's original image bytes, its side information as json and its class index (docs/data.md). "
                    "A rerun keeps the shards an earlier run finished and rewrites the rest.")
    shards.add_argument("--data", metavar="ROOT", help="WebVision-layout data root (required to convert)")
    shards.add_argument("--out", type=output_folder, metavar="DIR", help="output folder (created; required to convert)")
    shards.add_argument("--per-shard", type=positive_int, default=10_000, metavar="N",
                        help="records of the filelist per shard (default 10000; skipped images leave a shard shorter)")
    shards.add_argument("--workers", type=positive_int, default=1, metavar="W", help="processes writing shards (default 1)")
    shards.add_argument("--verify", metavar="DIR", help="instead of converting: check every shard's sample index "
                        "against its tar (a full scan; training checks only sizes, counts and checksums)")
    shards.set_defaults(func=_run_shards, parser=shards)


def _run(args) -> int:
    from megaclass.data.synth import SynthConfig, generate

    try:
        cfg = SynthConfig(classes=args.classes, per_class=args.per_class, val_per_class=args.val_per_class,
                          image_size=args.image_size, seed=args.seed, noise=args.noise)
        summary = generate(args.out, cfg)
    except (ValueError, OSError) as exc:
        print(f"megaclass synth: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("train_images", "val_images", "wrong_label_rate", "counts")}, indent=1))
    print(f"wrote {args.out}")
    return 0


def _run_shards(args) -> int:
    from megaclass.data.shards import convert, verify

    if args.verify:
        try:
            print(f"{args.verify}: {verify(args.verify)} samples, every sample index agrees with its shard")
        except (ValueError, OSError) as exc:
            print(f"megaclass shards: {exc}", file=sys.stderr)
            return 2
        return 0
    if not (args.data and args.out):
        args.parser.error("--data and --out are required (or --verify DIR)")
    try:
        index = convert(args.data, args.out, per_shard=args.per_shard, workers=args.workers)
    except (ValueError, OSError) as exc:
        print(f"megaclass shards: {exc}", file=sys.stderr)
        return 2
    splits = index["splits"]
    print(json.dumps({"train": splits["train"]["samples"], "val": splits["val"]["samples"],
                      "shards": sum(len(s["shards"]) for s in splits.values()), "skipped": index["skipped"]}, indent=1))
    print(f"wrote {args.out}/index.json")
    return 0
