"""The weighting's file formats.

PRED_TSV  `<image path as in the filelist><TAB><wnid>:<prob> <wnid>:<prob> …` (top k, best first)
OUT_TSV   `<image path><TAB><weight>` (one row per training image)
"""
from __future__ import annotations

import math
import os
import re
from array import array
from decimal import Decimal
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice, repeat
from pathlib import Path

import numpy as np

from megaclass.data.columns import StringBuilder, StringColumn, array_column, as_string_column, first_rows, lookup
from megaclass.io import atomic_output


SUM_TOLERANCE = 1e-4  # float32 softmax: each probability within a few ulps (~1e-7) of its exact value


def _rounding(text: str) -> float:
    """How far a printed probability may be from the value it was rounded from: half a unit of its last
    decimal ("0.1235": 5e-5; write_predictions' 6 decimals: 5e-7). A whole number ("1") is taken as exact."""
    exponent = Decimal(text).as_tuple().exponent
    return 0.5 * 10.0 ** exponent if isinstance(exponent, int) and exponent < 0 else 0.0


class TableError(ValueError):
    """A predictions or weights file is malformed; the message names the file and line."""


@dataclass(slots=True)
class Predictions:
    """Top-k predictions. `classes`: int64 [N, k] indices into the class list (-1 = none), `probs`:
    float32 [N, k]; row i belongs to the image `paths[i]` (a `StringColumn`, each path once)."""

    paths: StringColumn
    classes: np.ndarray
    probs: np.ndarray

    def align(self, paths: StringColumn | Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows in the order of `paths` -> (classes [M, k], probs [M, k], found bool [M]); images
        without a row get class -1 and probability 0."""
        index = lookup(self.paths, as_string_column(paths))
        found = index >= 0
        k = self.classes.shape[1]
        classes = np.full((len(paths), k), -1, dtype=np.int64)
        probs = np.zeros((len(paths), k), dtype=np.float32)
        classes[found], probs[found] = self.classes[index[found]], self.probs[index[found]]
        return classes, probs, found


BLOCK_LINES = 65536
_PLAIN_DECIMALS = re.compile(r"[0-9.\n]*")


@dataclass(slots=True)
class _PredictionRows:
    """PRED_TSV's rows while reading, as flat columns: 16M rows of 5 (class, prob) tuples would be ~10 GB
    of objects."""

    images: StringBuilder = field(default_factory=StringBuilder)
    linenos: array = field(default_factory=lambda: array("q"))
    lengths: array = field(default_factory=lambda: array("i"))
    classes: array = field(default_factory=lambda: array("i"))
    probs: array = field(default_factory=lambda: array("f"))


def read_predictions(path: str | os.PathLike, wnids: Sequence[str]) -> Predictions:
    """Read PRED_TSV against the class list `wnids` (line order of synsets.txt).

    Raises TableError (file:line) for a missing tab, an item that is not `wnid:prob`, a wnid that is
    not a class, a probability outside [0, 1], a class named twice in a row, probabilities summing
    above 1 by more than `SUM_TOLERANCE` plus the rounding of the printed values (half a unit of each
    one's last decimal: 5 values of 4 decimals may sum to 1 + 1e-4 + 2.5e-4), or an image listed twice.
    A block of `BLOCK_LINES` lines is checked at once (`_add_block`); a block with anything unusual in
    it is read again line by line (`_add_line`), which decides and names the line.
    """
    path = Path(path)
    class_of = {w: i for i, w in enumerate(wnids)}
    rows = _PredictionRows()
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise TableError(f"cannot read predictions {path}: {exc}") from exc
    with f:
        lineno = 0
        while lines := list(islice(f, BLOCK_LINES)):
            if not _add_block(rows, lines, lineno, class_of):
                for n, line in enumerate(lines, lineno + 1):
                    _add_line(rows, path, n, line, class_of, wnids)
            lineno += len(lines)
    if not rows.lengths:
        raise TableError(f"{path}: no predictions")
    images = rows.images.finish()
    _refuse_repeats(path, images, rows.linenos)
    length = np.frombuffer(rows.lengths, dtype=np.int32)
    k = int(length.max()) or 1
    classes = np.full((len(length), k), -1, dtype=np.int64)
    probs = np.zeros((len(length), k), dtype=np.float32)
    # row i's first length[i] cells, in row-major order: the order of the flat columns (a bool [N, k] mask,
    # not int64 row and column indices of every item)
    filled = np.arange(k) < length[:, None]
    classes[filled] = np.frombuffer(rows.classes, dtype=np.int32)
    probs[filled] = np.frombuffer(rows.probs, dtype=np.float32)
    return Predictions(images, classes, probs)


def _add_block(rows: _PredictionRows, lines: list[str], lineno: int, class_of: dict[str, int]) -> bool:
    """Add `lines` (the first is line `lineno` + 1) when every one of them is plainly well formed: a
    path, a tab, `wnid:prob` items of known classes, each class once, probabilities written as plain
    decimals, in range, and a sum clear of the limit by more than float rounding. Otherwise add nothing
    and return False: `_add_line` then reads the block and raises at the first bad line."""
    images, linenos, counts, items = [], [], [], []
    for n, line in enumerate(lines, lineno + 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        image, tab, rest = line.partition("\t")
        if not tab or not image:
            return False
        parts = rest.split()
        images.append(image)
        linenos.append(n)
        counts.append(len(parts))
        items += parts
    if not images:
        return True
    if (np.fromiter(map(str.count, items, repeat(":")), dtype=np.int64, count=len(items)) != 1).any():
        return False
    fields = "\n".join(items).replace(":", "\n").split("\n") if items else []
    wnid, prob = fields[0::2], fields[1::2]
    if not _PLAIN_DECIMALS.fullmatch("\n".join(prob)):
        return False
    classes = list(map(class_of.get, wnid))
    if None in classes:
        return False
    try:
        p = np.fromiter(map(float, prob), dtype=np.float64, count=len(prob))
    except ValueError:
        return False
    dot = np.fromiter(map(str.find, prob, repeat(".")), dtype=np.int64, count=len(prob))
    decimals = np.where(dot >= 0, np.fromiter(map(len, prob), dtype=np.int64, count=len(prob)) - dot - 1, 0)
    rounded = np.where(decimals > 0, 0.5 * np.power(10.0, -decimals.astype(np.float64)), 0.0)
    if np.any(p > 1.0 + SUM_TOLERANCE + rounded):
        return False
    count = np.asarray(counts, dtype=np.int64)
    k = int(count.max()) if len(count) else 0
    if k:
        filled = np.arange(k) < count[:, None]
        table = np.full((len(count), k), -1, dtype=np.int64)
        table[filled] = classes
        ordered = np.sort(table, axis=1)
        if np.any((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)):
            return False
        per_row = np.zeros((len(count), k))
        per_row[filled] = p
        margin = np.zeros((len(count), k))
        margin[filled] = rounded
        # a plain float sum is within a few ulps of math.fsum: a row that close to the limit is left to it
        if np.any(per_row.sum(1) > 1.0 + SUM_TOLERANCE + margin.sum(1) - 1e-9):
            return False
    for image in images:
        rows.images.append(image)
    rows.linenos.extend(linenos)
    rows.lengths.extend(counts)
    rows.classes.extend(classes)
    rows.probs.extend(p.tolist())
    return True


def _add_line(rows: _PredictionRows, path: Path, lineno: int, line: str, class_of: dict[str, int],
              wnids: Sequence[str]) -> None:
    """Add one line, or raise TableError naming it (`read_predictions`)."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return
    image, tab, rest = line.partition("\t")
    where = f"{path}:{lineno}"
    if not tab or not image:
        raise TableError(f"{where}: expected '<image path><TAB><wnid>:<prob> …', got {line[:120]!r}")
    items, rounding = [], 0.0
    for item in rest.split():
        wnid, colon, prob = item.partition(":")
        if not colon:
            raise TableError(f"{where}: {item!r} is not '<wnid>:<prob>'")
        if wnid not in class_of:
            raise TableError(f"{where}: {wnid!r} is not one of the {len(wnids)} classes of synsets.txt")
        try:
            p = float(prob)
            rounded = _rounding(prob)
        except (ValueError, ArithmeticError):  # decimal.InvalidOperation is an ArithmeticError
            raise TableError(f"{where}: probability {prob!r} is not a number") from None
        if not 0.0 <= p <= 1.0 + SUM_TOLERANCE + rounded:
            raise TableError(f"{where}: probability {prob} outside [0, 1]")
        if any(c == class_of[wnid] for c, _ in items):
            raise TableError(f"{where}: class {wnid} named twice (a top-k list names each class once)")
        items.append((class_of[wnid], p))
        rounding += rounded
    total = math.fsum(p for _, p in items)
    if total > 1.0 + SUM_TOLERANCE + rounding:
        raise TableError(f"{where}: probabilities sum to {total:.6g}, above 1 by more than the "
                         f"{SUM_TOLERANCE:g} of float32 softmax plus {rounding:.3g} for the rounding of the "
                         f"{len(items)} printed values (softmax probabilities of distinct classes sum to "
                         f"at most 1)")
    rows.images.append(image)
    rows.linenos.append(lineno)
    rows.lengths.append(len(items))
    for c, p in items:
        rows.classes.append(c)
        rows.probs.append(p)


def _refuse_repeats(path: Path, images: StringColumn, linenos: array) -> None:
    """TableError at the first line (in file order) that repeats an image of an earlier line."""
    repeats = np.flatnonzero(first_rows(images) != np.arange(len(images)))
    if len(repeats):
        i = int(repeats[0])
        raise TableError(f"{path}:{linenos[i]}: image {images[i]!r} listed twice")


def write_predictions(path: str | os.PathLike, paths: StringColumn | Sequence[str], wnids: Sequence[str],
                      classes: np.ndarray, probs: np.ndarray, block: int = 65536) -> None:
    """Write PRED_TSV atomically, a block of rows at a time (16M rows of text at once would be GBs of
    Python strings). classes: int [N, k] indices into wnids (-1 skipped), probs: [N, k]; row i is the
    image `paths[i]`."""
    classes, probs = np.asarray(classes), np.asarray(probs)
    if not len(paths) == len(classes) == len(probs):
        raise ValueError(f"{len(paths)} paths but {len(classes)} rows of classes and {len(probs)} of probabilities")
    paths = as_string_column(paths)
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for lo in range(0, len(paths), block):
            rows = np.arange(lo, min(lo + block, len(paths)))
            f.write("".join(image + "\t" + " ".join(f"{wnids[c]}:{p:.6f}" for c, p in zip(cs, ps) if c >= 0) + "\n"
                            for image, cs, ps in zip(paths.take(rows), classes[rows].tolist(), probs[rows].tolist())))


def write_weights(path: str | os.PathLike, paths: StringColumn | Sequence[str], weights: Sequence[float],
                  block: int = 65536) -> None:
    """Write OUT_TSV (`<image path><TAB><weight>`) atomically: a temp file in the same folder, then
    rename; written a block of rows at a time. Weights are written in Python's shortest exact form, so
    reading gives back the same floats."""
    weights = np.asarray(weights, dtype=np.float64)
    if len(paths) != len(weights):
        raise ValueError(f"{len(paths)} paths but {len(weights)} weights")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("weights must be finite and non-negative")
    paths = as_string_column(paths)
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for lo in range(0, len(weights), block):
            rows = np.arange(lo, min(lo + block, len(weights)))
            f.write("".join(f"{p}\t{w!r}\n" for p, w in zip(paths.take(rows), weights[rows].tolist())))


def read_weight_column(path: str | os.PathLike) -> tuple[StringColumn, np.ndarray]:
    """OUT_TSV -> (image paths, float64 weights), in file order. Raises TableError (file:line) on a
    malformed row, a weight that is not a finite non-negative number, or an image listed twice."""
    path = Path(path)
    images, weights, linenos = StringBuilder(), array("d"), array("q")
    try:
        with open(path, encoding="utf-8", newline="\n") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n").rstrip("\r")
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) != 2:
                    raise TableError(f"{path}:{lineno}: expected '<image path><TAB><weight>', got {line[:120]!r}")
                try:
                    w = float(parts[1])
                except ValueError:
                    raise TableError(f"{path}:{lineno}: weight {parts[1]!r} is not a number") from None
                if not math.isfinite(w) or w < 0:
                    raise TableError(f"{path}:{lineno}: weight must be finite and ≥ 0, got {parts[1]}")
                images.append(parts[0])
                weights.append(w)
                linenos.append(lineno)
    except (OSError, UnicodeDecodeError) as exc:
        raise TableError(f"cannot read weights {path}: {exc}") from exc
    images = images.finish()
    _refuse_repeats(path, images, linenos)
    return images, array_column(weights, np.float64)


def read_weights(path: str | os.PathLike) -> dict[str, float]:
    """OUT_TSV -> {image path: weight} (`read_weight_column` as a dict, for small tables)."""
    images, weights = read_weight_column(path)
    return dict(zip(images, weights.tolist()))
