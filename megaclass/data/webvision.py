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
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from megaclass.semantics.synsets import SynsetsError, read_synsets

log = logging.getLogger(__name__)

SOURCES = ("google", "flickr")
VAL_DIR = "val_images_256"


class WebVisionFormatError(ValueError):
    """A file the data set cannot do without (synsets.txt, a filelist) is missing or unusable."""


@dataclass(slots=True)
class TrainRecord:
    """One training image. `path` is relative to the data root, exactly as in the filelist."""

    path: str
    label: int
    source: str
    query: str
    rank: int | None = None
    title: str = ""
    description: str = ""
    tags: str = ""  # Flickr tags joined by spaces; "" for Google


@dataclass(slots=True)
class WebVision:
    """A loaded data set. `synsets[c] = (wnid, text)`; `val` holds (path relative to root, label)."""

    root: Path
    synsets: list[tuple[str, str]]
    train: list[TrainRecord]
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
        return self.queries.get(record.source, {}).get(int(number), "") if number.isdigit() else ""

    def train_items(self) -> list[tuple[str, int]]:
        """(path, label) pairs for `ImageDataset`."""
        return [(r.path, r.label) for r in self.train]

    def summary(self) -> str:
        """A readable report: sizes, then every skip reason with its count and first example."""
        by_source = Counter(r.source for r in self.train)
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


def _read_filelist(path: Path, num_classes: int, skipped: Counter, examples: dict) -> list[tuple[str, int]]:
    """`path label` lines. Malformed lines and labels out of range are skipped and counted."""
    items = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                _note(skipped, examples, "malformed filelist line", f"{path}:{lineno}: {line.strip()!r}")
                continue
            label = int(parts[1])
            if not 0 <= label < num_classes:
                _note(skipped, examples, "label out of range", f"{path}:{lineno}: {label} not in [0, {num_classes})")
                continue
            items.append((parts[0], label))
    return items


def _read_queries(path: Path) -> dict[int, str]:
    """`queries_<source>.txt`: "<number> <text>" -> {number: text}; absent file -> {}."""
    queries = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            number, _, text = line.strip().partition(" ")
            if number.isdigit():
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
    if not isinstance(entries, list):
        _note(skipped, examples, "broken metadata JSON", f"{path}: top level is {type(entries).__name__}, not a list")
        return None
    by_id = {}
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("id") in (None, ""):
            _note(skipped, examples, "metadata entry without id", f"{path}[{position}]")
            continue
        by_id[str(entry["id"])] = entry
    return by_id


def _fill(record: TrainRecord, entry: dict, where: str, skipped: Counter, examples: dict) -> None:
    rank = entry.get("rank")
    if rank is None:
        _note(skipped, examples, "missing field 'rank'", where)
    else:
        try:
            record.rank = int(rank)
        except (TypeError, ValueError):
            _note(skipped, examples, "unusable field 'rank'", f"{where}: {rank!r}")
    for key in ("title", "description") + (("tags",) if record.source == "flickr" else ()):
        if key not in entry:
            _note(skipped, examples, f"missing field '{key}'", where)
        else:
            setattr(record, key, _as_text(entry[key]))


def _existing_files(folder: Path, cache: dict) -> set[str]:
    """Names in `folder`, from its listing alone: no stat per file (16M of them on a network file
    system would take hours). An entry that is empty or not an image fails to decode later, and
    `ImageDataset` counts and skips it."""
    if folder not in cache:
        try:
            cache[folder] = set(os.listdir(folder))
        except OSError:
            cache[folder] = set()
    return cache[folder]


def load_webvision(root: str | os.PathLike, *, sources=SOURCES, check_images: bool = True,
                   progress: bool = False) -> WebVision:
    """Read a WebVision-layout data set at `root`.

    check_images: drop (and count) training/validation images whose file is missing, using one
    directory listing per folder. Images that exist but do not decode (empty, truncated) are handled
    by `ImageDataset`.
    """
    root = Path(root)
    info = root / "info"
    synsets = _read_class_list(info / "synsets.txt")
    skipped: Counter = Counter()
    examples: dict[str, str] = {}
    listings: dict[Path, set[str]] = {}
    train: list[TrainRecord] = []
    queries = {}
    for source in sources:
        filelist = info / f"train_filelist_{source}.txt"
        if not filelist.is_file():
            log.info("%s: absent, no %s images", filelist, source)
            continue
        queries[source] = _read_queries(info / f"queries_{source}.txt")
        by_query: dict[str, list[tuple[str, int]]] = {}
        for path, label in _read_filelist(filelist, len(synsets), skipped, examples):
            by_query.setdefault(Path(path).parent.name, []).append((path, label))
        groups = by_query.items()
        if progress:
            from tqdm import tqdm

            groups = tqdm(groups, desc=f"metadata {source}", unit="query")
        for query, items in groups:
            metadata = _read_metadata(root / source / f"{query}.json", skipped, examples)
            if metadata is None:
                _note(skipped, examples, "image without metadata (kept, no side information)",
                      items[0][0], len(items))
            for path, label in items:
                if check_images:
                    folder = root / Path(path).parent
                    if Path(path).name not in _existing_files(folder, listings):
                        _note(skipped, examples, "missing training image (dropped)", str(root / path))
                        continue
                record = TrainRecord(path, label, source, query)
                if metadata is not None:
                    entry = metadata.get(Path(path).stem)
                    if entry is None:
                        _note(skipped, examples, "image without metadata (kept, no side information)", path)
                    else:
                        _fill(record, entry, f"{root / source / query}.json id={record.path}", skipped, examples)
                train.append(record)
    if not any((info / f"train_filelist_{s}.txt").is_file() for s in sources):
        raise WebVisionFormatError(f"{info}: no train_filelist_{{{','.join(sources)}}}.txt")
    val = []
    val_list = info / "val_filelist.txt"
    if val_list.is_file():
        for name, label in _read_filelist(val_list, len(synsets), skipped, examples):
            path = f"{VAL_DIR}/{name}"
            if check_images and name not in _existing_files(root / VAL_DIR, listings):
                _note(skipped, examples, "missing validation image (dropped)", str(root / path))
                continue
            val.append((path, label))
    return WebVision(root, synsets, train, val, queries, skipped, examples)
