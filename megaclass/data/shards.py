"""WebVision as tar shards (the WebDataset layout): the converter and the indexed reader.

```
DIR/train-000000.tar   KEY.jpg (the original bytes; a PNG keeps .png), KEY.json (path, wnid, label,
DIR/train-000001.tar   source, query, rank, title, description, tags), KEY.cls (label, ASCII decimal)
DIR/val-000000.tar     KEY = shard number (6 digits) then index in the shard (at least 4 digits)
DIR/index.json         {"format": "megaclass-shards", "version": 1, "classes": [[wnid, text], ...],
                        "splits": {"train": {"samples": n, "shards": [{"name", "samples", "bytes"}]},
                                   "val": {...}}, "skipped": {reason: count}}
```

Conversion (`convert`): shard k of a split holds the split's records [k·N, (k+1)·N) in `load_webvision`
order, minus those whose file cannot be read or does not open as an image (header only: no decode, so
conversion runs at file-copy speed; a file that opens but does not decode is counted by the reader at
run time, as on files). Each shard is written to a temp file and renamed, then its completion record
(`DIR/.progress/NAME.json`: which records, how many bytes) is written; a rerun keeps every shard whose
record matches its plan and size, and rewrites the rest. `index.json` is written last, atomically.

Reading (`load_shards`, `ShardDataset`): one scan of each tar's headers (the image bytes are skipped,
not read) gives every sample's byte range, label and metadata; `ShardDataset[i]` then reads sample i
(position i of the concatenated shards) with one `pread`, so the engine's world-size-independent global
order (`megaclass.engine.data.RankBatches`) works on shards as it does on files. `shard_epoch_order`
is that order for shards: a seeded shard permutation, then a shuffle buffer.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megaclass.data.dataset import ImageDataset
from megaclass.io import atomic_output, atomic_write_text
from megaclass.seeding import derive_seed

log = logging.getLogger(__name__)

FORMAT, VERSION = "megaclass-shards", 1
SPLITS = ("train", "val")
PROGRESS = ".progress"  # per-shard completion records of a conversion
FILE_UNREADABLE = "image file that cannot be read (dropped)"
NOT_AN_IMAGE = "image that does not open (dropped)"
_META = ("json", "cls")


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
            writer.write({"__key__": key, extension: data,
                          "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
                          "cls": str(label).encode("ascii")})
            count += 1
    record = {**job.plan(), "samples": count, "bytes": final.stat().st_size, "skipped": dict(skipped)}
    atomic_write_text(Path(job.out) / PROGRESS / f"{job.name}.json", json.dumps(record))
    return record


def _kept(job: _Job) -> dict | None:
    """The completion record of a shard an earlier run finished, when it is this job's shard intact."""
    try:
        record = json.loads((Path(job.out) / PROGRESS / f"{job.name}.json").read_text())
        size = (Path(job.out) / job.name).stat().st_size
    except (OSError, ValueError):
        return None
    plan = job.plan()
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in plan.items()) or record.get("bytes") != size:
        return None
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
    for path in out.iterdir():  # shards of an earlier conversion with another layout; temp files of a killed one
        split_shard = path.name.split("-")[0] in SPLITS and path.name.endswith(".tar") and path.name not in planned
        if split_shard or (path.name.startswith(".") and path.name.endswith(".tar")):
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
                         "shards": [{"name": r["name"], "samples": r["samples"], "bytes": r["bytes"]} for r in shards]}
    index = {"format": FORMAT, "version": VERSION, "classes": [list(c) for c in data.synsets], "splits": splits,
             "skipped": dict(sorted(skipped.items()))}
    atomic_write_text(out / "index.json", json.dumps(index, indent=1, ensure_ascii=False))
    return index


# -- reading -------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Sample:
    """Where one sample's image lies, and its metadata (KEY.json)."""

    shard: int
    """index into `Shards.files`"""
    offset: int
    size: int
    meta: dict

    @property
    def path(self) -> str:
        return self.meta["path"]

    @property
    def label(self) -> int:
        return self.meta["label"]


@dataclass(slots=True)
class Shards:
    """A shard folder as read: the class list, skip counts, and each split's samples in position order
    (shards in index.json order, then tar order)."""

    folder: Path
    classes: list[tuple[str, str]]
    skipped: dict
    files: dict[str, list[Path]]
    sizes: dict[str, list[int]]
    samples: dict[str, list[Sample]]

    @property
    def wnids(self) -> list[str]:
        return [w for w, _ in self.classes]


def read_index(folder: str | os.PathLike) -> dict:
    """index.json, checked against the pinned format (a clear error naming the file otherwise)."""
    path = Path(folder) / "index.json"
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
                if not (isinstance(shard["name"], str) and "/" not in shard["name"] and int(shard["samples"]) >= 0):
                    raise ValueError(shard)
        if not index["classes"] or any(len(c) != 2 for c in index["classes"]):
            raise ValueError("classes")
    except (KeyError, TypeError, ValueError) as exc:
        raise ShardFormatError(f"{path}: malformed ({type(exc).__name__}: {exc})") from None
    return index


def scan_shard(path: Path, shard: int, num_classes: int) -> list[Sample]:
    """Every sample of the tar at `path`, in tar order, from its headers and small members; the image
    bytes are skipped (seeked over), not read."""
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
    out = []
    for key, parts in samples.items():
        try:
            meta = json.loads(parts["json"])
            label = int(parts["cls"])
            if meta["label"] != label or not 0 <= label < num_classes or not isinstance(meta["path"], str):
                raise ValueError(f"label {label} (json says {meta['label']}) or path {meta['path']!r}")
            out.append(Sample(shard, *parts["image"], meta))
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardFormatError(f"{path}: sample {key!r} incomplete or inconsistent ({type(exc).__name__}: {exc})") from None
    return out


def load_shards(folder: str | os.PathLike, splits=SPLITS) -> Shards:
    """Read index.json and scan the shards of `splits`; each shard must hold the samples the index says."""
    folder = Path(folder)
    index = read_index(folder)
    classes = [(str(w), str(t)) for w, t in index["classes"]]
    files, sizes, samples = {}, {}, {}
    for split in splits:
        entries = index["splits"][split]["shards"]
        files[split] = [folder / e["name"] for e in entries]
        sizes[split] = [int(e["samples"]) for e in entries]
        samples[split] = []
        for number, (path, expected) in enumerate(zip(files[split], sizes[split])):
            got = scan_shard(path, number, len(classes))
            if len(got) != expected:
                raise ShardFormatError(f"{path}: holds {len(got)} samples, index.json says {expected} (truncated or replaced?)")
            samples[split].extend(got)
    return Shards(folder, classes, dict(index.get("skipped", {})), files, sizes, samples)


class ShardDataset(ImageDataset):
    """`ImageDataset` over the samples of one split of a shard folder: item i is position i (shards in
    index order, then tar order); its image comes from one positioned read of its shard. Unreadable
    images are skipped and counted as on files."""

    MAX_OPEN = 16  # open shard files per process: a shuffle buffer spans only a few shards

    def __init__(self, shards: Shards, split: str, image_size: int, train: bool, preload: bool = False):
        self.files = shards.files[split]
        self.sizes = shards.sizes[split]
        """samples per shard, in position order (the shard order draws from these)"""
        self.locations = [(s.shard, s.offset, s.size) for s in shards.samples[split]]
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()
        super().__init__(shards.folder, [(s.path, s.label) for s in shards.samples[split]], image_size, train, preload)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a DataLoader worker: its parent's descriptors stay the parent's
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.pop(shard, None)
        if fd is None:
            fd = os.open(self.files[shard], os.O_RDONLY)
            while len(self._fds) >= self.MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[shard] = fd
        return fd

    def _encoded(self, index: int) -> bytes:
        shard, offset, size = self.locations[index]
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise OSError(f"{self.files[shard]}: short read at byte {offset} (shard truncated?)")
        return data

    def _where(self, index: int) -> str:
        shard, offset, _ = self.locations[index]
        return f"{self.files[shard]}@{offset} ({self.items[index][0]})"

    def __getstate__(self):  # DataLoader workers under spawn: descriptors do not travel
        state = self.__dict__.copy()
        state["_fds"] = OrderedDict()
        return state


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
    rng = np.random.default_rng(derive_seed(seed, "shard order", epoch))
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
