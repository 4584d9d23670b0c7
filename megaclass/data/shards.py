"""WebVision as tar shards (the WebDataset layout): the converter and the indexed reader.

```
DIR/train-000000.tar   KEY.jpg (the original bytes; a PNG keeps .png), KEY.json (path, wnid, label,
DIR/train-000001.tar   source, query, rank, title, description, tags), KEY.cls (label, ASCII decimal)
DIR/val-000000.tar     KEY = shard number (6 digits) then index in the shard (at least 4 digits)
DIR/train-000000.idx   the shard's sample index (below)
DIR/index.json         {"format": "megaclass-shards", "version": 1, "classes": [[wnid, text], ...],
                        "splits": {"train": {"samples": n, "shards": [{"name", "samples", "bytes",
                                   "index": {"name", "bytes", "sha256"}}]}, "val": {...}},
                        "skipped": {reason: count}}
```

A shard's sample index (`NAME.idx`, the tar's name with `.idx`) is five `.npy` arrays one after the other
(`numpy.lib.format`), one row per sample in tar order: the image's data offset in the tar (int64), its
size (int64), its label (int32), then its path (KEY.json's `path`) as a `StringColumn`: offsets (int64,
samples + 1) and UTF-8 bytes (uint8). index.json's `index` entry names it with its size and SHA-256.
Shard folders written before the sample index existed (no `index` entries) are still read, by a scan of
each tar (`scan_shard`; slow at 16M images: rerun `megaclass shards`, which rewrites them with indexes).

Conversion (`convert`): shard k of a split holds the split's records [k·N, (k+1)·N) in `load_webvision`
order, minus those whose file cannot be read or does not open as an image (header only: no decode, so
conversion runs at file-copy speed; a file that opens but does not decode is counted by the reader at
run time, as on files). Each shard is written to a temp file and renamed, then its sample index (the
same way), then its completion record (`DIR/.progress/NAME.json`: which records, how many bytes, the
index's size and SHA-256); a rerun keeps every shard whose record matches its plan, its size and its
index, and rewrites the rest. `index.json` is written last, atomically.

Reading (`load_shards`, `ShardDataset`): the sample indexes, checked against index.json (sizes, SHA-256,
sample counts, each tar's size), give every sample's byte range, label and path as numpy columns (36
bytes a sample plus its path's, no Python object per sample); `ShardDataset[i]` then reads sample i (position i of the
concatenated shards) with one `pread`, so the engine's world-size-independent global
order (`megaclass.engine.data.RankBatches`) works on shards as it does on files. `shard_epoch_order`
is that order for shards: a seeded shard permutation, then a shuffle buffer. The folder may also be a
URL (an object store, `megaclass.data.store`): its files are then copied into a node-local cache first.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megaclass.data.columns import StringColumn
from megaclass.data.dataset import ImageDataset
from megaclass.data.store import ShardFetchError, ShardStore, is_url
from megaclass.io import atomic_output, atomic_write_bytes, atomic_write_text
from megaclass.seeding import derive_seed

log = logging.getLogger(__name__)

FORMAT, VERSION = "megaclass-shards", 1
SPLITS = ("train", "val")
PROGRESS = ".progress"  # per-shard completion records of a conversion
FILE_UNREADABLE = "image file that cannot be read (dropped)"
NOT_AN_IMAGE = "image that does not open (dropped)"
_META = ("json", "cls")
_INDEX_DTYPES = ("<i8", "<i8", "<i4", "<i8", "|u1")  # offset, size, label, path offsets, path bytes
_BLOCK = 512  # a tar block; webdataset's TarWriter writes USTAR headers, one block each


class ShardFormatError(ValueError):
    """index.json or a shard is missing, of another format, or disagrees with the other."""


# -- conversion ----------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Job:
    """Shard `number` of `split`: the split's records [first, first + len(samples))."""

    split: str
    number: int
    first: int
    samples: list  # [(path relative to root, label, metadata dict)]
    root: str
    out: str
    key_digits: int

    @property
    def name(self) -> str:
        return shard_name(self.split, self.number)

    def plan(self) -> dict:
        """What a completion record must say for this shard to be kept on a rerun."""
        return {"name": self.name, "first": self.first, "records": len(self.samples),
                "first_path": self.samples[0][0], "last_path": self.samples[-1][0], "key_digits": self.key_digits}


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def index_name(shard: str) -> str:
    """The sample index's file name of the shard named `shard`."""
    return shard.removesuffix(".tar") + ".idx"


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def index_bytes(offsets, sizes, labels, paths: StringColumn) -> bytes:
    """A shard's sample index (module docstring): deterministic bytes, so reruns are byte-identical."""
    out = io.BytesIO()
    for array, dtype in zip((offsets, sizes, labels, paths.offsets, paths.buffer), _INDEX_DTYPES):
        np.lib.format.write_array(out, np.asarray(array, dtype=dtype), version=(1, 0), allow_pickle=False)
    return out.getvalue()


def _image_format(data: bytes) -> str:
    """The file extension of the image in `data` ("jpg", "png", ...), from its header alone; raises
    what PIL raises for a file that is not an image (or a decompression bomb)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        kind = (img.format or "").lower()
    return {"jpeg": "jpg", "": "img"}.get(kind, kind)


def _write_shard(job: _Job) -> dict:
    """Write one shard (atomically) and its completion record; returns the record."""
    from PIL import Image
    from webdataset import TarWriter

    skipped: Counter = Counter()
    count = 0
    offsets, sizes, labels, paths = [], [], [], []
    final = Path(job.out) / job.name
    with atomic_output(final) as tmp, open(tmp, "wb") as stream, TarWriter(stream, mtime=0) as writer:
        for relative, label, meta in job.samples:
            try:  # load_webvision(check_images=True) has confined every path to the root, links resolved
                data = (Path(job.root) / relative).read_bytes()
            except OSError as exc:
                log.warning("%s: %s/%s (%s)", FILE_UNREADABLE, job.root, relative, exc)
                skipped[FILE_UNREADABLE] += 1
                continue
            try:
                extension = _image_format(data)
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
                log.warning("%s: %s/%s (%s: %s)", NOT_AN_IMAGE, job.root, relative, type(exc).__name__, exc)
                skipped[NOT_AN_IMAGE] += 1
                continue
            key = f"{job.number:06d}{count:0{job.key_digits}d}"
            members = {extension: data, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
                       "cls": str(label).encode("ascii")}
            # where the image's bytes land: TarWriter writes the members in sorted order, a header block each
            position = writer.tarstream.offset
            for name in sorted(members):
                if name == extension:
                    offsets.append(position + _BLOCK)
                position += _BLOCK + _padded(len(members[name]))
            writer.write({"__key__": key, **members})
            if writer.tarstream.offset != position:
                raise RuntimeError(f"{final}: the tar writer's layout is not the one the sample index assumes")
            sizes.append(len(data))
            labels.append(label)
            paths.append(meta["path"])
            count += 1
    index = index_bytes(offsets, sizes, labels, StringColumn.from_strings(paths))
    atomic_write_bytes(Path(job.out) / index_name(job.name), index)
    record = {**job.plan(), "samples": count, "bytes": final.stat().st_size, "skipped": dict(skipped),
              "index": {"name": index_name(job.name), "bytes": len(index), "sha256": hashlib.sha256(index).hexdigest()}}
    atomic_write_text(Path(job.out) / PROGRESS / f"{job.name}.json", json.dumps(record))
    return record


def _kept(job: _Job) -> dict | None:
    """The completion record of a shard an earlier run finished, when it is this job's shard intact."""
    try:
        record = json.loads((Path(job.out) / PROGRESS / f"{job.name}.json").read_text())
        size = (Path(job.out) / job.name).stat().st_size
        index = (Path(job.out) / index_name(job.name)).read_bytes()
    except (OSError, ValueError):
        return None  # no sample index (a conversion before them): the shard is rewritten with one
    plan = job.plan()
    if (not isinstance(record, dict) or any(record.get(k) != v for k, v in plan.items()) or record.get("bytes") != size
            or not isinstance(record.get("index"), dict) or record["index"].get("bytes") != len(index)
            or record["index"].get("sha256") != hashlib.sha256(index).hexdigest()):
        return None  # the reader's checks, so that what it refuses a rerun rewrites
    return record


def _jobs(data, root: str, out: str, per_shard: int) -> Iterator[_Job]:
    """The shards to write, built one at a time (16M records never sit in memory twice)."""
    digits = max(4, len(str(per_shard - 1)))
    wnids = data.wnids
    n = len(data.train)
    for number, first in enumerate(range(0, n, per_shard)):
        samples = []
        for i in range(first, min(first + per_shard, n)):
            r = data.train[i]
            samples.append((r.path, r.label, {
                "path": r.path, "wnid": wnids[r.label], "label": r.label, "source": r.source,
                "query": data.query_text(r), "rank": r.rank, "title": r.title, "description": r.description,
                "tags": r.tags}))
        yield _Job("train", number, first, samples, root, out, digits)
    for number, first in enumerate(range(0, len(data.val), per_shard)):
        samples = [(path, label, {"path": path, "wnid": wnids[label], "label": label, "source": "val", "query": "",
                                  "rank": None, "title": "", "description": "", "tags": ""})
                   for path, label in data.val[first:first + per_shard]]
        yield _Job("val", number, first, samples, root, out, digits)


def _planned_names(data, per_shard: int) -> set[str]:
    count = {"train": len(data.train), "val": len(data.val)}
    return {shard_name(s, k) for s in SPLITS for k in range(-(-count[s] // per_shard))}


def convert(root: str | os.PathLike, out: str | os.PathLike, per_shard: int = 10_000, workers: int = 1,
            progress: bool = True) -> dict:
    """Convert the WebVision-layout set at `root` into shards in `out`; returns index.json's content.
    `workers` > 1 writes shards in that many processes."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from megaclass.data.webvision import load_webvision

    if per_shard < 1 or workers < 1:
        raise ValueError(f"per_shard and workers must be at least 1, got {per_shard} and {workers}")
    root, out = str(root), Path(out)
    data = load_webvision(root, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / PROGRESS).mkdir(exist_ok=True)
    planned = _planned_names(data, per_shard)
    planned |= {index_name(name) for name in planned}
    for path in out.iterdir():  # shards of an earlier conversion with another layout; temp files of a killed one
        ours = path.name.endswith((".tar", ".idx"))
        split_shard = path.name.split("-")[0] in SPLITS and ours and path.name not in planned
        if split_shard or (path.name.startswith(".") and ours):
            path.unlink()
    records: dict[str, dict] = {}
    total = len(data.train) + len(data.val)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="shards", unit="img", dynamic_ncols=True)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    pending = set()
    try:
        for job in _jobs(data, root, str(out), per_shard):
            record = _kept(job)
            if record is None:
                (out / "index.json").unlink(missing_ok=True)  # never an index naming a shard being rewritten
                if pool is None:
                    record = _write_shard(job)
                else:
                    pending.add(pool.submit(_write_shard, job))
                    if len(pending) >= 2 * workers:  # bounded: the plan of 16M images is built as it is written
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            finished = future.result()
                            records[finished["name"]] = finished
                            bar is not None and bar.update(finished["records"])
                    continue
            records[record["name"]] = record
            if bar is not None:
                bar.update(record["records"])
        for future in pending:
            finished = future.result()
            records[finished["name"]] = finished
            bar is not None and bar.update(finished["records"])
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    skipped = Counter(data.skipped)
    splits = {}
    for split in SPLITS:
        shards = [records[name] for name in sorted(records) if name.startswith(f"{split}-")]
        for record in shards:
            skipped.update(record["skipped"])
        splits[split] = {"samples": sum(r["samples"] for r in shards),
                         "shards": [{"name": r["name"], "samples": r["samples"], "bytes": r["bytes"],
                                     "index": r["index"]} for r in shards]}
    index = {"format": FORMAT, "version": VERSION, "classes": [list(c) for c in data.synsets], "splits": splits,
             "skipped": dict(sorted(skipped.items()))}
    atomic_write_text(out / "index.json", json.dumps(index, indent=1, ensure_ascii=False))
    return index


# -- reading -------------------------------------------------------------------------------------------
@dataclass(slots=True)
class ShardColumns:
    """The samples of one split in position order (shards in index.json order, then tar order), as
    columns: a few numpy arrays and one string column, not a Python object per sample."""

    shard: np.ndarray
    """int32 [N]: index into `Shards.files[split]`"""
    offset: np.ndarray
    """int64 [N]: where the image's bytes start in its tar"""
    size: np.ndarray
    """int64 [N]: the image's bytes"""
    label: np.ndarray
    """int64 [N]"""
    paths: StringColumn
    """[N] each sample's original path (KEY.json's `path`): its key for weights and predictions"""

    def __len__(self) -> int:
        return len(self.label)

    def head(self, n: int) -> ShardColumns:
        """The first `n` positions."""
        return ShardColumns(self.shard[:n], self.offset[:n], self.size[:n], self.label[:n],
                            self.paths.take(np.arange(min(n, len(self)))))

    @property
    def nbytes(self) -> int:
        return self.shard.nbytes + self.offset.nbytes + self.size.nbytes + self.label.nbytes + self.paths.nbytes


class _ColumnsBuilder:
    """Fills the columns of `n` samples shard by shard: the numeric ones in place, so that loading
    never holds two copies of them (only the path bytes are joined at the end)."""

    def __init__(self, n: int):
        self.shard, self.label = np.empty(n, np.int32), np.empty(n, np.int64)
        self.offset, self.size, self.path_lengths = (np.empty(n, np.int64) for _ in range(3))
        self.path_bytes: list[np.ndarray] = []
        self.at = 0

    def add(self, number: int, offsets, sizes, labels, paths: StringColumn) -> None:
        rows = slice(self.at, self.at + len(paths))
        self.shard[rows], self.offset[rows], self.size[rows], self.label[rows] = number, offsets, sizes, labels
        self.path_lengths[rows] = paths.lengths()
        self.path_bytes.append(paths.buffer)
        self.at = rows.stop

    def finish(self) -> ShardColumns:
        assert self.at == len(self.label)
        path_offsets = np.zeros(self.at + 1, dtype=np.int64)
        np.cumsum(self.path_lengths, out=path_offsets[1:])
        buffer = np.concatenate([np.zeros(0, np.uint8)] + self.path_bytes)
        return ShardColumns(self.shard, self.offset, self.size, self.label, StringColumn(buffer, path_offsets))


@dataclass(slots=True)
class Shards:
    """A shard folder as read: the class list, skip counts, and each split's samples."""

    classes: list[tuple[str, str]]
    skipped: dict
    files: dict[str, list[Path]]
    sizes: dict[str, list[int]]
    """samples per shard"""
    columns: dict[str, ShardColumns]
    store: ShardStore
    tar_bytes: dict[str, list[int]]

    @property
    def folder(self) -> Path:
        """Where the files are read: the folder, or the local cache's copy of a URL's."""
        return self.store.folder

    @property
    def wnids(self) -> list[str]:
        return [w for w, _ in self.classes]


def _file_name(value) -> bool:
    return isinstance(value, str) and "/" not in value and value not in ("", ".", "..")


def read_index(folder: str | os.PathLike | ShardStore) -> dict:
    """index.json, checked against the pinned format (a clear error naming the file otherwise)."""
    store = folder if isinstance(folder, ShardStore) else ShardStore(folder)
    path = store.index()  # from a URL: copied first (ShardFetchError when that fails)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardFormatError(f"{path}: missing (is {folder} a folder that `megaclass shards` finished?)") from None
    except (OSError, ValueError) as exc:
        raise ShardFormatError(f"{path}: unreadable or not JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ShardFormatError(f"{path}: not a {FORMAT} version {VERSION} index")
    try:
        for split in SPLITS:
            for shard in index["splits"][split]["shards"]:
                if not (_file_name(shard["name"]) and int(shard["samples"]) >= 0 and int(shard["bytes"]) >= 0):
                    raise ValueError(shard)
                entry = shard.get("index")
                if entry is not None and not (_file_name(entry["name"]) and int(entry["bytes"]) >= 0
                                              and isinstance(entry["sha256"], str)):
                    raise ValueError(shard)
        if not index["classes"] or any(len(c) != 2 for c in index["classes"]):
            raise ValueError("classes")
    except (KeyError, TypeError, ValueError) as exc:
        raise ShardFormatError(f"{path}: malformed ({type(exc).__name__}: {exc})") from None
    return index


def read_shard_index(path: Path, entry: dict, samples: int, tar_bytes: int, num_classes: int) -> tuple:
    """(offsets, sizes, labels, paths) of one shard from its sample index at `path`, which must be the
    file index.json's `entry` describes and agree with the shard (`samples`, `tar_bytes`, labels in range)."""
    rerun = "rerun `megaclass shards` to rewrite it"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ShardFormatError(f"{path}: unreadable sample index ({exc}); {rerun}") from None
    if len(data) != int(entry["bytes"]) or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ShardFormatError(f"{path}: {len(data)} bytes whose size or SHA-256 differs from index.json's "
                               f"(damaged or replaced); {rerun}")
    stream = io.BytesIO(data)
    arrays = []
    try:
        for dtype in _INDEX_DTYPES:
            array = np.lib.format.read_array(stream, allow_pickle=False)
            if array.dtype != np.dtype(dtype) or array.ndim != 1:
                raise ValueError(f"array {len(arrays)} is {array.dtype} {array.shape}, not 1-D {dtype}")
            arrays.append(array)
    except (ValueError, EOFError, OSError) as exc:
        raise ShardFormatError(f"{path}: not a sample index ({exc}); {rerun}") from None
    offsets, sizes, labels, path_offsets, path_bytes = arrays
    problem = None
    if not len(offsets) == len(sizes) == len(labels) == len(path_offsets) - 1 == samples:
        problem = f"{len(offsets)} samples, index.json says {samples}"
    elif samples and ((sizes < 0).any() or (offsets < _BLOCK).any() or (offsets + sizes > tar_bytes).any()):
        problem = f"an image byte range outside the tar's {tar_bytes} bytes"
    elif samples and not ((labels >= 0).all() and (labels < num_classes).all()):
        problem = f"a label outside 0..{num_classes - 1}"
    elif path_offsets[0] != 0 or path_offsets[-1] != len(path_bytes) or (np.diff(path_offsets) < 0).any():
        problem = "path offsets that do not cover its path bytes"
    if problem:
        raise ShardFormatError(f"{path}: {problem}; {rerun}")
    return offsets, sizes, labels, StringColumn(path_bytes, path_offsets)


def scan_shard(path: Path, num_classes: int) -> tuple:
    """(offsets, sizes, labels, paths) of the tar at `path`, in tar order, from its headers and small
    members (the image bytes are seeked over, not read): a folder written before sample indexes."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key, _, extension = member.name.partition(".")
                parts = samples.setdefault(key, {})
                if extension in _META:
                    parts[extension] = tar.extractfile(member).read()
                else:
                    parts["image"] = (member.offset_data, member.size)
    except (OSError, tarfile.TarError) as exc:
        raise ShardFormatError(f"{path}: unreadable tar ({exc})") from None
    offsets, sizes, labels, paths = [], [], [], []
    for key, parts in samples.items():
        try:
            meta = json.loads(parts["json"])
            label = int(parts["cls"])
            if meta["label"] != label or not 0 <= label < num_classes or not isinstance(meta["path"], str):
                raise ValueError(f"label {label} (json says {meta['label']}) or path {meta['path']!r}")
            offsets.append(parts["image"][0])
            sizes.append(parts["image"][1])
            labels.append(label)
            paths.append(meta["path"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardFormatError(f"{path}: sample {key!r} incomplete or inconsistent ({type(exc).__name__}: {exc})") from None
    return offsets, sizes, labels, StringColumn.from_strings(paths)


def load_shards(location: str | os.PathLike | ShardStore, splits=SPLITS, cache: str | os.PathLike | None = None) -> Shards:
    """Read index.json and the sample indexes of `splits` (shards without one are scanned); each shard
    must be as long as the index says and hold the samples it says. `location`: a folder, or a URL whose
    files are copied into the node-local `cache` (`megaclass.data.store`: index.json and the sample
    indexes here, each tar when it is first read)."""
    store = location if isinstance(location, ShardStore) else ShardStore(location, cache)
    index = read_index(store)
    classes = [(str(w), str(t)) for w, t in index["classes"]]
    files, sizes, tar_bytes, columns = {}, {}, {}, {}
    scanned = 0
    for split in splits:
        entries = index["splits"][split]["shards"]
        files[split] = [store.path(e["name"]) for e in entries]
        sizes[split] = [int(e["samples"]) for e in entries]
        tar_bytes[split] = [int(e["bytes"]) for e in entries]
        builder = _ColumnsBuilder(sum(sizes[split]))
        for number, (path, entry) in enumerate(zip(files[split], entries)):
            expected, size = int(entry["samples"]), int(entry["bytes"])
            if not store.remote:  # a URL's tar is checked when it is copied
                try:
                    actual = path.stat().st_size
                except OSError as exc:
                    raise ShardFormatError(f"{path}: unreadable shard ({exc})") from None
                if actual != size:
                    raise ShardFormatError(f"{path}: {actual} bytes, index.json says {size} (truncated or replaced?)")
            if entry.get("index") is None:
                got = scan_shard(store.fetch(path.name, size), len(classes))
                scanned += 1
            else:
                sample_index = store.fetch(entry["index"]["name"], int(entry["index"]["bytes"]), entry["index"]["sha256"])
                got = read_shard_index(sample_index, entry["index"], expected, size, len(classes))
            if len(got[0]) != expected:
                raise ShardFormatError(f"{path}: holds {len(got[0])} samples, index.json says {expected} (truncated or replaced?)")
            builder.add(number, *got)
        columns[split] = builder.finish()
    if scanned:
        log.info("%s: %d shards have no sample index and were scanned instead (slow at millions of images); "
                 "rerun `megaclass shards` on this folder to write the indexes", store.location, scanned)
    return Shards(classes, dict(index.get("skipped", {})), files, sizes, columns, store, tar_bytes)


def verify(folder: str | os.PathLike) -> int:
    """The deep check (`megaclass shards --verify DIR`): `load_shards`' checks, then every shard's sample
    index against a scan of its tar (headers, KEY.json and KEY.cls); a ShardFormatError names the first
    that differs. Returns the samples checked. Costs the scan the indexes spare training (docs/scale.md)."""
    if is_url(folder):
        raise ShardFormatError(f"{folder}: --verify reads a folder; run it where the shards were written")
    shards = load_shards(folder)
    for split, columns in shards.columns.items():
        start = 0
        for path, size in zip(shards.files[split], shards.sizes[split]):
            offsets, sizes, labels, paths = scan_shard(path, len(shards.classes))
            rows = slice(start, start + size)
            if not (np.array_equal(offsets, columns.offset[rows]) and np.array_equal(sizes, columns.size[rows])
                    and np.array_equal(labels, columns.label[rows])
                    and paths == columns.paths.take(np.arange(start, start + size))):
                raise ShardFormatError(f"{path.parent / index_name(path.name)}: byte ranges, labels or paths differ "
                                       f"from what {path.name} holds; rerun `megaclass shards` to rewrite it")
            start += size
    return sum(len(c) for c in shards.columns.values())


class _Items(Sequence):
    """`ImageDataset.items` of a `ShardDataset`: (path, label) of position i, made from the columns when
    asked for (a list of N tuples would be the per-sample Python objects the columns avoid)."""

    def __init__(self, columns: ShardColumns):
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns)

    def __getitem__(self, i: int) -> tuple[str, int]:
        if not 0 <= i < len(self.columns):
            raise IndexError(f"position {i} of {len(self.columns)}")
        return self.columns.paths[i], int(self.columns.label[i])


class ShardDataset(ImageDataset):
    """`ImageDataset` over the samples of one split of a shard folder: item i is position i (shards in
    index order, then tar order); its image comes from one positioned read of its shard. Unreadable
    images are skipped and counted as on files."""

    MAX_OPEN = 16  # open shard files per process: a shuffle buffer spans only a few shards

    def __init__(self, shards: Shards, split: str, image_size: int, train: bool, preload: bool = False):
        self.files = shards.files[split]
        self.sizes = shards.sizes[split]
        """samples per shard, in position order (the shard order draws from these)"""
        self.store, self.tar_bytes = shards.store, shards.tar_bytes[split]
        self.columns = shards.columns[split]
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()
        super().__init__(shards.folder, _Items(self.columns), image_size, train, preload)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a DataLoader worker: its parent's descriptors stay the parent's
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.pop(shard, None)
        if fd is None:  # from a URL, the tar is copied into the cache first, unless it is there
            fd = os.open(self.store.fetch(self.files[shard].name, self.tar_bytes[shard]), os.O_RDONLY)
            while len(self._fds) >= self.MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[shard] = fd
        return fd

    def _encoded(self, index: int) -> bytes:
        shard, offset, size = (int(self.columns.shard[index]), int(self.columns.offset[index]),
                               int(self.columns.size[index]))
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise OSError(f"{self.files[shard]}: short read at byte {offset} (shard truncated?)")
        return data

    def _where(self, index: int) -> str:
        shard, offset = int(self.columns.shard[index]), int(self.columns.offset[index])
        return f"{self.files[shard]}@{offset} ({self.columns.paths[index]})"

    def prefetch(self, order) -> threading.Thread | None:
        """From a URL: copy the tars into the cache in the background, in `order` (shard numbers, as they
        are first read), skipping those another process of the node is copying. A failure is only logged
        here: the read that needs the shard copies it again, and raises. None for a folder."""
        if not self.store.remote:
            return None

        def run():
            for shard in order:
                try:
                    self.store.fetch(self.files[shard].name, self.tar_bytes[shard], wait=False)
                except (ShardFetchError, OSError) as exc:
                    log.warning("prefetch: %s", exc)

        thread = threading.Thread(target=run, name="shard-prefetch", daemon=True)
        thread.start()
        return thread

    def __getstate__(self):  # DataLoader workers under spawn: descriptors do not travel
        state = self.__dict__.copy()
        state["_fds"] = OrderedDict()
        return state


def _order_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, "shard order", epoch))


def shard_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The `count` shards in the order `shard_epoch_order` reads them in `epoch` (its first draw)."""
    return _order_rng(seed, epoch).permutation(count)


def shard_epoch_order(sizes: list[int], seed: int, epoch: int, buffer: int,
                      labels: torch.Tensor | None = None) -> torch.Tensor:
    """The global sample order of `epoch` over positions (shards concatenated): a seeded permutation of
    the shards, then a shuffle buffer of `buffer` samples (filled from that stream, emptied in random
    order), so that reads stay within the few shards the buffer spans.

    With `labels` ([N], one per position), class-balanced: the epoch's N draws are counted out to the
    samples as the file path's sampler would draw them (a class uniformly, then one of its images: a
    multinomial with p_i = 1 / (classes × count of i's class)), and each sample appears that many times
    at its place in the stream. A web filelist is grouped by query, so a shard holds few classes:
    balancing inside one buffer could not balance the epoch; counting draws over the whole epoch does."""
    rng = _order_rng(seed, epoch)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    stream = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in rng.permutation(len(sizes))] or [[]])
    stream = stream.astype(np.int64)
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(labels)
        p = 1.0 / (np.count_nonzero(counts) * counts[labels])
        draws = rng.multinomial(len(labels), p / p.sum())
        stream = np.repeat(stream, draws[stream])
    window = np.arange(len(stream)) // buffer
    return torch.from_numpy(stream[np.lexsort((rng.random(len(stream)), window))])
