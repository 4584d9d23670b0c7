"""`megaclass bench WHAT`: each benchmark is a module of this package exposing `register(subparsers)`."""
from __future__ import annotations

import importlib

BENCHMARKS = ("megaclass.bench.ce", "megaclass.bench.knn", "megaclass.bench.weights", "megaclass.bench.train",
              "megaclass.bench.data", "megaclass.bench.lm", "megaclass.bench.shards", "megaclass.bench.input")


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark; see `megaclass bench -h`")
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="WHAT")
    for module in BENCHMARKS:
        importlib.import_module(module).register(sub)
