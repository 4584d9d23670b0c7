"""`megaclass bench WHAT`: each benchmark is a module of this package exposing `register(subparsers)`."""
from __future__ import annotations

import importlib

BENCHMARKS = {
    "ce": ("megaclass.bench.ce", "fused linear + weighted cross-entropy against its peers and the GEMM floor"),
    "knn": ("megaclass.bench.knn", "K-nearest-category search at 100k+ classes against the GEMM floor"),
    "weights": ("megaclass.bench.weights", "keywords + stage-2 scores throughput"),
    "train": ("megaclass.bench.train", "training images/s and peak memory against plain DDP"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark; see `megaclass bench -h`")
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="WHAT")
    for name, (module, help_text) in BENCHMARKS.items():
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            sub.add_parser(name, help=f"{help_text} (not available: {module} missing)")
