"""argparse types for the command lines' numbers: a bad value is refused where it is parsed, with
argparse's own message (`argument --block-size: must be a positive integer, got '-5'`, exit 2),
before any work starts. Output paths likewise: `output_file` / `output_folder` check that the path
can be written (`megaclass.io.check_writable`) while the command line is parsed."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from megaclass.io import check_writable


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _checked(kind, what: str, ok):
    def parse(text: str):
        value = _number(text, kind, what)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _checked(int, "a positive integer", lambda v: v > 0)
nonnegative_int = _checked(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _checked(float, "a finite number > 0", lambda v: v > 0)
unit_float = _checked(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def _output(folder: bool):
    def parse(text: str) -> Path:
        try:
            return check_writable(text, "", folder=folder)
        except OSError as exc:
            raise argparse.ArgumentTypeError(str(exc).strip()) from None

    parse.__name__ = "output folder" if folder else "output file"
    return parse


output_file = _output(folder=False)  # a file the command will write: checked before any work
output_folder = _output(folder=True)
