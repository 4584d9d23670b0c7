"""Reader for the WebVision layout (1.0 and 2.0, as published).

```
info/synsets.txt                "n01440764 tench, Tinca tinca"   (line order = class index)
info/train_filelist_google.txt  "google/q0001/<id>.jpg <class index>"
info/train_filelist_flickr.txt  "flickr/q0001/<id>.jpg <class index>"
info/val_filelist.txt           "<name>.jpg <class index>"   (images in val_images_256/)
info/queries_google.txt         "<query number> <query text>"   (optional)
google/q0001.json               [{"id": "<id>", "rank": 1, "title": "...", "description": "..."}, ...]
flickr/q0001.json               the same, plus "tags"
```

Damage is expected at this scale: a broken JSON file, a missing field, non-UTF-8 text, a missing
image. Each is skipped and counted (`WebVision.skipped`), the rest loads, and `summary()` reports
the counts. An image without metadata stays in the training set (rank None, empty text); an image
whose file is missing is dropped. One `json.loads` per query file and one directory listing per
query folder keep 1M images to about a minute.

Rules (docs/data.md): every path stays inside the root (`megaclass.data.paths`: relative, no `..`,
links resolved; anything else is dropped and counted, never opened); an image listed twice keeps
its first line (filelists in source order, then line order) and every later line is dropped and
counted, separately when its label differs; a metadata id listed twice keeps its first entry; a
rank must be a positive integer (else the rank is unknown, counted).
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megaclass.data.columns import (SOURCES, StringBuilder, StringColumn, TrainBuilder, TrainColumns, TrainRecord,
                                    array_column, first_rows)
from megaclass.data.paths import inside, plain_relative, real_root
from megaclass.semantics.synsets import SynsetsError, read_synsets

log = logging.getLogger(__name__)

VAL_DIR = "val_images_256"
MAX_RANK = 2**31 - 1  # a search rank is a position in a result list; beyond this it is damage
_INTEGER = re.compile(r"-?[0-9]{1,18}")  # ASCII digits only: int() would accept '٣' and reject '²'
OUTSIDE = "path outside the data root (dropped, never opened)"


class WebVisionFormatError(ValueError):
    """A file the data set cannot do without (synsets.txt, a filelist) is missing or unusable."""


@dataclass(slots=True)
class WebVision:
    """A loaded data set. `synsets[c] = (wnid, text)`; `train` the training images as columns
    (`megaclass.data.columns`: `train[i]` is a `TrainRecord`, `train.labels` an array);
    `val` holds (path relative to root, label). `root` is the data root or the shards folder."""

    root: Path
    synsets: list[tuple[str, str]]
    train: TrainColumns
    val: list[tuple[str, int]]
    queries: dict[str, dict[int, str]] = field(default_factory=dict)  # source -> {query number: text}
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # skip reason -> first place it happened

    @property
    def wnids(self) -> list[str]:
        return [wnid for wnid, _ in self.synsets]

    @property
    def num_classes(self) -> int:
        return len(self.synsets)

    def query_text(self, record: TrainRecord) -> str:
        """The search query that found `record` ("" when queries_<source>.txt is absent)."""
        number = record.query.lstrip("q")
        return self.queries.get(record.source, {}).get(int(number), "") if _INTEGER.fullmatch(number) else ""

    def query_texts(self) -> list[str]:
        """The query text of each of `train.query_keys` (index with `train.queries` for per image)."""
        return [self.query_text(TrainRecord("", 0, source, query)) for source, query in self.train.query_keys]

    def train_items(self) -> list[tuple[str, int]]:
        """(path, label) pairs for `ImageDataset`."""
        return list(zip(self.train.paths, self.train.labels.tolist()))

    def summary(self) -> str:
        """A readable report: sizes, then every skip reason with its count and first example."""
        by_source = {SOURCES[s]: int(n) for s, n in enumerate(np.bincount(self.train.sources)) if n}
        lines = [f"WebVision at {self.root}: {self.num_classes} classes, {len(self.train)} training images "
                 f"({', '.join(f'{s} {n}' for s, n in sorted(by_source.items()))}), {len(self.val)} validation images"]
        if not self.skipped:
            lines.append("  nothing skipped")
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped {count} × {reason} (first: {self.examples.get(reason, '?')})")
        return "\n".join(lines)


def _note(skipped: Counter, examples: dict, reason: str, where: str, count: int = 1) -> None:
    skipped[reason] += count
    examples.setdefault(reason, where)


def _read_class_list(path: Path) -> list[tuple[str, str]]:
    """`info/synsets.txt` through the one strict reader (`megaclass.semantics.read_synsets`): a BOM,
    tabs, a duplicate or an ill-formed wnid are handled as `megaclass semantics` handles them, as a
    WebVisionFormatError naming the file and line. Whether each wnid is a WordNet noun is checked
    where WordNet is used (semantics, stage 2), not here: training needs no WordNet."""
    if not path.is_file():
        raise WebVisionFormatError(f"{path}: missing (the class list of a WebVision-layout data set)")
    try:
        return read_synsets(path, check_wordnet=False)
    except SynsetsError as exc:
        raise WebVisionFormatError(str(exc)) from None


@dataclass(slots=True)
class _Lines:
    """The usable lines of filelists, as columns in reading order: image path (prefix added), label,
    which of `files` the line is in and its line number there."""

    files: list[Path]
    images: StringColumn
    labels: np.ndarray
    file: np.ndarray
    lineno: np.ndarray

    def where(self, i: int) -> str:
        return f"{self.files[self.file[i]]}:{self.lineno[i]}"


def _read_filelists(files: list[Path], num_classes: int, skipped: Counter, examples: dict,
                    prefix: str = "") -> _Lines:
    """`path label` lines of each file in turn -> `_Lines`. Malformed lines, labels out of range, paths
    that leave the root (lexically) and repeats of a path of an earlier line of any of `files` are
    skipped and counted; the first line of a path wins."""
    images, labels, file_of, linenos = StringBuilder(), array("q"), array("i"), array("q")
    for number, path in enumerate(files):
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2 or not _INTEGER.fullmatch(parts[1]):
                    _note(skipped, examples, "malformed filelist line", f"{path}:{lineno}: {line.strip()[:200]!r}")
                    continue
                label = int(parts[1])
                if not 0 <= label < num_classes:
                    _note(skipped, examples, "label out of range", f"{path}:{lineno}: {label} not in [0, {num_classes})")
                    continue
                image = prefix + parts[0]
                if not plain_relative(image):
                    _note(skipped, examples, OUTSIDE,
                          f"{path}:{lineno}: {parts[0][:200]!r} is not a relative path without '..'")
                    continue
                images.append(image)
                labels.append(label)
                file_of.append(number)
                linenos.append(lineno)

    lines = _Lines(files, images.finish(), array_column(labels, np.int64), array_column(file_of, np.int32),
                   array_column(linenos, np.int64))
    # repeats found by a hash join on the path column, not a dict of every path (~2 GB at 16M)
    first = first_rows(lines.images)
    repeats = np.flatnonzero(first != np.arange(len(first)))
    for i, j in zip(repeats.tolist(), first[repeats].tolist()):
        image, label, first_label = lines.images[i], int(lines.labels[i]), int(lines.labels[j])
        if first_label == label:
            _note(skipped, examples, "duplicate filelist line (first kept)",
                  f"{lines.where(i)}: {image} (first: {lines.where(j)})")
        else:
            _note(skipped, examples, "duplicate filelist line with another label (first kept)",
                  f"{lines.where(i)}: {image} label {label} (first: {lines.where(j)}, label {first_label})")
    if len(repeats):
        keep = np.flatnonzero(first == np.arange(len(first)))
        lines = _Lines(files, lines.images.take(keep), lines.labels[keep], lines.file[keep], lines.lineno[keep])
    return lines


def _read_queries(path: Path) -> dict[int, str]:
    """`queries_<source>.txt`: "<number> <text>" -> {number: text}; absent file -> {}."""
    queries = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            number, _, text = line.strip().partition(" ")
            if _INTEGER.fullmatch(number):
                queries[int(number)] = text.strip()
    return queries


def _as_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value if v is not None)
    return str(value)


def _read_metadata(path: Path, skipped: Counter, examples: dict) -> dict[str, dict] | None:
    """One query's JSON list -> {id: entry}. None when the file is missing or broken."""
    try:
        raw = path.read_bytes()
    except OSError:
        _note(skipped, examples, "missing metadata JSON", str(path))
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _note(skipped, examples, "non-UTF-8 metadata JSON (bad bytes replaced)", f"{path}: {exc}")
        text = raw.decode("utf-8", errors="replace")
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        _note(skipped, examples, "broken metadata JSON", f"{path}:{exc.lineno}: {exc.msg}")
        return None
    except (ValueError, RecursionError) as exc:  # an integer of > 4,300 digits; nesting deeper than the stack
        _note(skipped, examples, "broken metadata JSON", f"{path}: {type(exc).__name__}: {str(exc)[:200]}")
        return None
    if not isinstance(entries, list):
        _note(skipped, examples, "broken metadata JSON", f"{path}: top level is {type(entries).__name__}, not a list")
        return None
    by_id = {}
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("id") in (None, ""):
            _note(skipped, examples, "metadata entry without id", f"{path}[{position}]")
            continue
        key = str(entry["id"])
        if key in by_id:
            _note(skipped, examples, "duplicate metadata id (first kept)", f"{path}[{position}]: id {key[:200]!r}")
            continue
        by_id[key] = entry
    return by_id


def _show(value) -> str:
    """A short repr for a message (an int of 10**400 has no repr under Python's digit limit)."""
    try:
        return repr(value)[:60]
    except ValueError:
        return f"<{type(value).__name__} too long to print>"


def _rank(value) -> int | None:
    """A search rank: a positive integer (a JSON integer, an integral number such as 3.0, or a string
    of digits); None for anything else (true, 2.7, 0, -5, Infinity, 1e400, 10**400)."""
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        value = int(value)
    elif isinstance(value, float) and value.is_integer():  # False for inf and nan
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_RANK:
        return value
    return None


def _fill(source: str, entry: dict, json_name: str, image: str, skipped: Counter, examples: dict) -> tuple:
    """An entry's (rank or None, title, description, tags), each damage counted (at `json_name`'s entry
    of `image`: the name is formatted once per JSON file, not with pathlib for each of 16M entries)."""
    where = f"{json_name} id={image}"
    rank = entry.get("rank")
    if rank is None:
        _note(skipped, examples, "missing field 'rank'", where)
    else:
        rank_value = _rank(rank)
        if rank_value is None:
            _note(skipped, examples, "field 'rank' not a positive integer (rank unknown)", f"{where}: {_show(rank)}")
        rank = rank_value
    texts = []
    for key in ("title", "description", "tags"):
        if key == "tags" and source != "flickr":
            texts.append("")
        elif key not in entry:
            _note(skipped, examples, f"missing field '{key}'", where)
            texts.append("")
        else:
            texts.append(_as_text(entry[key]))
    return (rank, *texts)


class _Root:
    """The data root with links resolved, and one listing per image folder: the names in it and which
    of them are symbolic links (`os.scandir` tells without a stat per file: 16M stats on a network
    file system would take hours). Only a link is resolved on its own, to check it stays inside."""

    def __init__(self, root: Path):
        self.root, self.real = root, real_root(root)
        self._folders: dict[str, tuple[set[str], set[str]] | None] = {}

    def file(self, relative: str) -> Path | None:
        """`root/relative` if it resolves inside the root (it need not exist), else None."""
        real = os.path.realpath(os.path.join(self.real, relative))
        return Path(real) if plain_relative(relative) and inside(real, self.real) else None

    def _listing(self, folder: str) -> tuple[set[str], set[str]] | None:
        if folder not in self._folders:
            real = os.path.realpath(os.path.join(self.real, folder))
            if not inside(real, self.real):
                self._folders[folder] = None
            else:
                names, links = set(), set()
                try:
                    for entry in os.scandir(real):  # closed when exhausted
                        names.add(entry.name)
                        if entry.is_symlink():  # from the listing's d_type, no stat
                            links.add(entry.name)
                except OSError:
                    pass
                self._folders[folder] = names, links
        return self._folders[folder]

    def image(self, relative: str) -> str:
        """'ok', 'missing' or 'outside' for an image path that is already plain relative. An entry that
        exists but is empty or not an image fails to decode later, and `ImageDataset` counts it."""
        folder, _, name = relative.rpartition("/")
        listing = self._listing(folder)
        if listing is None:
            return "outside"
        names, links = listing
        if name not in names:
            return "missing"
        if name in links and self.file(relative) is None:
            return "outside"
        return "ok"


def _parent_name(path: str) -> str:
    """`Path(path).parent.name` by string operations (pathlib's objects cost ~20 µs an image at 16M)."""
    return posixpath.basename(posixpath.dirname(posixpath.normpath(path)))


def _stem(path: str) -> str:
    """`Path(path).stem`: the file name without its last suffix (a name starting with its only dot kept)."""
    name = posixpath.basename(posixpath.normpath(path))
    dot = name.rfind(".")
    return name[:dot] if 0 < dot < len(name) - 1 else name


def _info_file(root: _Root, path: Path) -> Path:
    """An info/ file the data set cannot do without, refused when it resolves outside the root."""
    if root.file(os.path.relpath(path, root.root)) is None:
        raise WebVisionFormatError(f"{path}: resolves to {os.path.realpath(path)}, outside the data root "
                                   f"{root.real}; the reader opens nothing outside its root")
    return path


def load_webvision(root: str | os.PathLike, *, sources=SOURCES, check_images: bool = True,
                   progress: bool = False) -> WebVision:
    """Read a WebVision-layout data set at `root`.

    check_images: drop (and count) training/validation images whose file is missing or whose folder
    or link resolves outside the root, using one directory listing per folder. Without it only the
    paths themselves are checked (`ImageDataset` checks links again before it opens a file). Images
    that exist but do not decode (empty, truncated) are handled by `ImageDataset`.
    """
    root = Path(root)
    info = root / "info"
    base = _Root(root)
    synsets = _read_class_list(_info_file(base, info / "synsets.txt"))
    skipped: Counter = Counter()
    examples: dict[str, str] = {}
    train = TrainBuilder()
    queries = {}
    present = []
    for source in sources:
        filelist = info / f"train_filelist_{source}.txt"
        if not filelist.is_file():
            log.info("%s: absent, no %s images", filelist, source)
            continue
        _info_file(base, filelist)
        query_file = info / f"queries_{source}.txt"
        if query_file.is_file() and base.file(f"info/{query_file.name}") is None:
            _note(skipped, examples, "queries file outside the data root (not read)", str(query_file))
        else:
            queries[source] = _read_queries(query_file)
        present.append(source)
    lines = _read_filelists([info / f"train_filelist_{source}.txt" for source in present], len(synsets),
                            skipped, examples)
    for number, source in enumerate(present):
        # the lines of each query folder together, folders in order of first appearance, lines in file order
        rows = np.flatnonzero(lines.file == number)
        folder_of: dict[str, int] = {}
        folder = np.fromiter((folder_of.setdefault(_parent_name(p), len(folder_of))
                              for p in lines.images.take(rows)), dtype=np.int64, count=len(rows))
        rows = rows[np.argsort(folder, kind="stable")]
        bounds = np.flatnonzero(np.diff(np.sort(folder), prepend=-1, append=len(folder_of))) if len(rows) else []
        groups = zip(list(folder_of), zip(bounds[:-1], bounds[1:]))
        if progress:
            from tqdm import tqdm

            groups = tqdm(groups, total=len(folder_of), desc=f"metadata {source}", unit="query")
        for query, (lo, hi) in groups:
            group = rows[lo:hi]
            paths = lines.images.take(group).tolist()
            labels = lines.labels[group].tolist()
            json_path = root / source / f"{query}.json"
            json_name = str(json_path)
            if base.file(f"{source}/{query}.json") is None:
                _note(skipped, examples, "metadata JSON outside the data root (not read)", str(json_path))
                metadata = None
            else:
                metadata = _read_metadata(json_path, skipped, examples)
            if metadata is None:
                _note(skipped, examples, "image without metadata (kept, no side information)", paths[0], len(paths))
            for path, label in zip(paths, labels):
                if check_images:
                    state = base.image(path)
                    if state != "ok":
                        reason = OUTSIDE if state == "outside" else "missing training image (dropped)"
                        _note(skipped, examples, reason, str(root / path))
                        continue
                side = ()
                if metadata is not None:
                    entry = metadata.get(_stem(path))
                    if entry is None:
                        _note(skipped, examples, "image without metadata (kept, no side information)", path)
                    else:
                        side = _fill(source, entry, json_name, path, skipped, examples)
                train.append(path, label, source, query, *side)
    if not any((info / f"train_filelist_{s}.txt").is_file() for s in sources):
        raise WebVisionFormatError(f"{info}: no train_filelist_{{{','.join(sources)}}}.txt")
    val = []
    val_list = info / "val_filelist.txt"
    if val_list.is_file():
        val_lines = _read_filelists([_info_file(base, val_list)], len(synsets), skipped, examples,
                                    prefix=f"{VAL_DIR}/")
        for path, label in zip(val_lines.images, val_lines.labels.tolist()):
            if check_images:
                state = base.image(path)
                if state != "ok":
                    reason = OUTSIDE if state == "outside" else "missing validation image (dropped)"
                    _note(skipped, examples, reason, str(root / path))
                    continue
            val.append((path, label))
    return WebVision(root, synsets, train.finish(), val, queries, skipped, examples)
