"""One reader interface, two sources: `load_metadata(path)` reads a WebVision-layout root (its JSON
files, `megaclass.data.webvision`) or a folder of tar shards (`index.json` + `KEY.json` members, the
format `megaclass shards` writes, docs/data.md) into the same `WebVision` of columns.

From shards only the `.json` members are read (webdataset's tar iterator, image members skipped
unread). Each sample's JSON is checked as the JSON reader checks an entry: a path that leaves the
root, a repeated path, a label out of range, a rank that is not a positive integer, a missing field
are each counted (the same reasons) and the image dropped or kept as there; the counts `index.json`
carries from the shards' writing are added. A missing or unreadable shard is counted, its images
dropped, the rest loads.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path, PurePosixPath

from megaclass.data.columns import SOURCES, TrainBuilder
from megaclass.data.paths import plain_relative
from megaclass.data.store import INDEX, ShardStore, is_url
from megaclass.data.webvision import (_INTEGER, OUTSIDE, WebVision, WebVisionFormatError, _as_text, _note, _rank,
                                      _show, load_webvision)


def is_shards(path: str | os.PathLike) -> bool:
    """A shards folder (it holds index.json) or a shards URL (`megaclass.data.store`)."""
    return is_url(path) or (Path(path) / INDEX).is_file()


def load_metadata(path: str | os.PathLike, *, check_images: bool = True, progress: bool = False,
                  cache: str | os.PathLike | None = None) -> WebVision:
    """A shards folder (it holds index.json) or URL, or a WebVision-layout root, read into columns.
    `check_images` applies to a root (a shard holds its images); `cache` to a URL."""
    if is_shards(path):
        return load_shards(path, progress=progress, cache=cache)
    return load_webvision(path, check_images=check_images, progress=progress)


def _read_index(where: Path) -> dict:
    try:
        index = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise WebVisionFormatError(f"{where}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(index, dict) or index.get("format") != "megaclass-shards" or index.get("version") != 1:
        raise WebVisionFormatError(f"{where}: not a megaclass-shards index of version 1")
    classes, splits = index.get("classes"), index.get("splits")
    if (not isinstance(classes, list) or not classes
            or not all(isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) for x in c) for c in classes)):
        raise WebVisionFormatError(f"{where}: 'classes' must be a non-empty list of [wnid, text]")
    if not isinstance(splits, dict) or not isinstance(splits.get("train"), dict):
        raise WebVisionFormatError(f"{where}: no 'splits' with a 'train' split")
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list) or not all(
                isinstance(s, dict) and isinstance(s.get("name"), str) and "/" not in s["name"]
                and s["name"] not in ("", ".", "..") for s in shards):
            raise WebVisionFormatError(f"{where}: split {name!r} needs 'shards': [{{'name': a file of this folder, "
                                       f"'samples': n}}, ...]")
    return index


def _samples(shard: Path, skipped: Counter, examples: dict):
    """(where, decoded JSON or None) of each sample of one shard; a missing or broken shard counted."""
    from webdataset.tariterators import tar_file_iterator

    try:
        with open(shard, "rb") as f:
            for member in tar_file_iterator(f, select_files=lambda name: name.endswith(".json")):
                where = f"{shard}:{member['fname']}"
                try:
                    yield where, json.loads(member["data"].decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                    _note(skipped, examples, "broken sample JSON in a shard (dropped)", f"{where}: {str(exc)[:200]}")
                    yield where, None
    except OSError as exc:  # a missing file; tarfile.ReadError is an OSError too
        _note(skipped, examples, "unreadable shard (its images dropped)", f"{shard}: {str(exc)[:200]}")


def _label(value, num_classes: int) -> int | None:
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < num_classes:
        return value
    return None


def _side_information(source: str, sample: dict, where: str, skipped: Counter, examples: dict) -> tuple:
    """(rank or None, title, description, tags) of a sample. A null rank is an unknown one, counted when the
    shard was written (in index.json's skipped); a rank that is not a positive integer, or a text field that is
    absent, is damage to the shard itself and counted here."""
    rank = sample.get("rank")
    if rank is not None:
        value = _rank(rank)
        if value is None:
            _note(skipped, examples, "field 'rank' not a positive integer (rank unknown)", f"{where}: {_show(rank)}")
        rank = value
    texts = []
    for key in ("title", "description", "tags"):
        if key not in sample:
            _note(skipped, examples, f"missing field '{key}'", where)
        texts.append(_as_text(sample.get(key)) if key != "tags" or source == "flickr" else "")
    return (rank, *texts)


def load_shards(location: str | os.PathLike, *, progress: bool = False, cache: str | os.PathLike | None = None) -> WebVision:
    """Read the metadata of a shards folder or URL (module docstring; from a URL each tar is copied into
    the node's `cache` first, where training then finds it)."""
    store = ShardStore(location, cache)
    index = _read_index(store.index())
    folder = store.folder
    synsets = [tuple(c) for c in index["classes"]]
    skipped: Counter = Counter()
    examples: dict[str, str] = {}
    for reason, count in (index.get("skipped") or {}).items():
        if isinstance(count, int) and count > 0:
            _note(skipped, examples, str(reason), f"{folder / INDEX} (counted when the shards were written)", count)
    train, val = TrainBuilder(), []
    queries: dict[str, dict[int, str]] = {}
    seen: dict[str, tuple[int, str]] = {}
    for split in ("train", "val"):
        shards = index["splits"].get(split, {}).get("shards", [])
        if progress:
            from tqdm import tqdm

            shards = tqdm(shards, desc=f"shards {split}", unit="shard")
        for shard in shards:
            # from a URL: copied into the cache first (ShardFetchError when that fails after its tries)
            path = store.fetch(shard["name"], shard["bytes"] if isinstance(shard.get("bytes"), int) else None)
            for where, sample in _samples(path, skipped, examples):
                if sample is None:
                    continue
                if not isinstance(sample, dict) or not isinstance(sample.get("path"), str):
                    _note(skipped, examples, "sample JSON without a path (dropped)", where)
                    continue
                path = sample["path"]
                label = _label(sample.get("label"), len(synsets))
                if label is None:
                    _note(skipped, examples, "label out of range", f"{where}: {str(sample.get('label'))[:60]}")
                    continue
                if not plain_relative(path):
                    _note(skipped, examples, OUTSIDE, f"{where}: {path[:200]!r} is not a relative path without '..'")
                    continue
                if split == "val":
                    val.append((path, label))
                    continue
                if path in seen:
                    first_label, first = seen[path]
                    reason = ("duplicate filelist line (first kept)" if first_label == label
                              else "duplicate filelist line with another label (first kept)")
                    _note(skipped, examples, reason, f"{where}: {path} (first: {first})")
                    continue
                source = sample.get("source")
                if source not in SOURCES:
                    _note(skipped, examples, "sample JSON with an unknown source (dropped)", f"{where}: {source!r}")
                    continue
                seen[path] = (label, where)
                query = PurePosixPath(path).parent.name
                number = query.lstrip("q")
                text = _as_text(sample.get("query"))
                if text and _INTEGER.fullmatch(number):
                    queries.setdefault(source, {}).setdefault(int(number), text)
                train.append(path, label, source, query, *_side_information(source, sample, where, skipped, examples))
    return WebVision(folder, synsets, train.finish(), val, queries, skipped, examples)
