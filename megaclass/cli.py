"""The `megaclass` console script. Each subcommand lives beside the code it drives and exposes
`register(subparsers)`; modules are imported only when their subcommand runs, so `--help` is fast."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "train": ("megaclass.train", "train one model (every rank runs it; `deepspeed --module megaclass.train`)"),
    "experiment": ("megaclass.experiment", "baseline -> +Stage1 -> +Stage1+Stage2 (`deepspeed --module megaclass.experiment`)"),
    "predict": ("megaclass.predict", "a checkpoint's top-k on the training images -> PRED.tsv for `weights`"),
    "bench": ("megaclass.bench.cli", "benchmark the fused op (`megaclass bench ce`) and more"),
    "semantics": ("megaclass.semantics.cli", "K nearest categories from WordNet + BERT -> knn.tsv"),
    "synth": ("megaclass.data.cli", "write the embedded synthetic WebVision-layout data set"),
    "shards": ("megaclass.data.cli", "convert a WebVision-layout data set into tar shards (jpg + json + cls)"),
    "weights": ("megaclass.weighting.cli", "stage-1 / stage-2 per-image loss weights -> weights.tsv"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="megaclass", description="megaclass: large-class training on noisy web images.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    from megaclass import log

    log.setup()  # progress and warnings on stderr, rank-aware; a command's own output stays on stdout
    module = importlib.import_module(COMMANDS[argv[0]][0])
    full = argparse.ArgumentParser(prog="megaclass")
    module.register(full.add_subparsers(dest="command", required=True))
    args = full.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
