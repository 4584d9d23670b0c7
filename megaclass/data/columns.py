"""Per-image side information as columns: numpy arrays, strings as one UTF-8 buffer plus offsets.

One Python object per image costs ~100 bytes of headers before its strings (a `TrainRecord` with
five `str`s is ~600 bytes at WebVision's field lengths): 16M images would need ~10 GB for that alone.
Columns cost the strings' bytes plus 8 bytes of offset each, and numeric fields 1-4 bytes, so 16M
images of metadata fit in a few GB and every per-image computation can be a numpy expression.
`TrainColumns[i]` still builds a `TrainRecord` on the fly, for code that wants one image at a time.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np

SOURCES = ("google", "flickr")


class StringColumn:
    """N strings: `buffer` uint8 [total bytes] (UTF-8), `offsets` int64 [N + 1]; string i is
    `buffer[offsets[i]:offsets[i + 1]]`."""

    __slots__ = ("buffer", "offsets")
    TAKE_BLOCK = 65536

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray):
        self.buffer, self.offsets = buffer, offsets

    @classmethod
    def from_strings(cls, strings) -> StringColumn:
        builder = StringBuilder()
        for s in strings:
            builder.append(s)
        return builder.finish()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.buffer[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")

    def __iter__(self, block: int = 65536):
        # a block of strings at a time: the whole buffer as bytes and N offsets as Python ints would
        # cost ~40 bytes an image beside the column while it is iterated
        for start in range(0, len(self), block):
            offsets = self.offsets[start:start + block + 1]
            data, offsets = self.buffer[offsets[0]:offsets[-1]].tobytes(), (offsets - offsets[0]).tolist()
            for lo, hi in zip(offsets[:-1], offsets[1:]):
                yield data[lo:hi].decode("utf-8")

    def tolist(self) -> list[str]:
        return list(self)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def slice(self, lo: int, hi: int) -> StringColumn:
        """Strings lo..hi-1 as a column sharing this one's bytes."""
        offsets = self.offsets[lo:hi + 1]
        return StringColumn(self.buffer[offsets[0]:offsets[-1]], offsets - offsets[0])

    def take(self, index: np.ndarray) -> StringColumn:
        """The strings at `index` (int array), as a new column."""
        index = np.asarray(index, dtype=np.int64)
        starts = self.offsets[:-1][index]
        lengths = self.offsets[1:][index] - starts  # not lengths()[index]: an O(N) diff per take
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        buffer = np.empty(offsets[-1], dtype=np.uint8)
        for lo in range(0, len(index), self.TAKE_BLOCK):  # int64 positions of a block of strings, not of all bytes
            hi = min(lo + self.TAKE_BLOCK, len(index))
            # byte positions of the new buffer in the old one: each string's start, then +1 per byte
            position = (np.repeat(starts[lo:hi] - offsets[lo:hi], lengths[lo:hi])
                        + np.arange(offsets[lo], offsets[hi], dtype=np.int64))
            buffer[offsets[lo]:offsets[hi]] = self.buffer[position]
        return StringColumn(buffer, offsets)

    def __eq__(self, other) -> bool:
        return (isinstance(other, StringColumn) and np.array_equal(self.offsets, other.offsets)
                and np.array_equal(self.buffer, other.buffer))

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes + self.offsets.nbytes


class StringBuilder:
    """Appends strings into a `StringColumn`: the bytes into one growing bytearray and the offsets into
    one growing array, which become the column's arrays without a copy. Once large, glibc grows each in
    place with mremap; blocks joined and then copied into the column would leave their freed space in
    the heap, resident beside the column (measured: 2.29 GB instead of ~1.5 GB reading 2M images)."""

    def __init__(self):
        self._data, self._offsets = bytearray(), array("q", [0])

    def append(self, s: str) -> None:
        self._data += s.encode("utf-8", errors="replace")  # lone surrogates from a JSON escape: replaced, not fatal
        self._offsets.append(len(self._data))

    def finish(self) -> StringColumn:
        """The column; the builder starts empty again."""
        data, offsets = self._data, self._offsets
        self._data, self._offsets = bytearray(), array("q", [0])
        return StringColumn(np.frombuffer(data, dtype=np.uint8), np.frombuffer(offsets, dtype=np.int64))


def array_column(a: array, dtype) -> np.ndarray:
    """`a` as a numpy array sharing its memory (no copy at the end of reading); `a` must not grow again."""
    return np.frombuffer(a, dtype=dtype)


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
class TrainColumns:
    """The training images as columns, N rows in reading order.

    paths, titles, descriptions, tags: StringColumn [N]; labels: int32 [N] class indices;
    sources: uint8 [N] indices into `SOURCES`; queries: int32 [N] indices into `query_keys`, the
    distinct (source, query folder) pairs; ranks: int32 [N] search rank, 0 = unknown.
    """

    paths: StringColumn
    labels: np.ndarray
    sources: np.ndarray
    queries: np.ndarray
    query_keys: list[tuple[str, str]]
    ranks: np.ndarray
    titles: StringColumn
    descriptions: StringColumn
    tags: StringColumn

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} of {len(self)}")
        i = int(i) % len(self)
        rank = int(self.ranks[i])
        return TrainRecord(self.paths[i], int(self.labels[i]), SOURCES[self.sources[i]],
                           self.query_keys[self.queries[i]][1], rank or None, self.titles[i],
                           self.descriptions[i], self.tags[i])

    def __iter__(self):
        columns = (self.paths, self.titles, self.descriptions, self.tags)
        for i, (path, title, description, tags) in enumerate(zip(*columns)):
            rank = int(self.ranks[i])
            yield TrainRecord(path, int(self.labels[i]), SOURCES[self.sources[i]],
                              self.query_keys[self.queries[i]][1], rank or None, title, description, tags)

    def take(self, index: np.ndarray) -> TrainColumns:
        index = np.asarray(index, dtype=np.int64)
        return TrainColumns(self.paths.take(index), self.labels[index], self.sources[index], self.queries[index],
                            self.query_keys, self.ranks[index], self.titles.take(index),
                            self.descriptions.take(index), self.tags.take(index))

    def drop_text(self) -> None:
        """Free the descriptions and tags (the bulk of the text, ~200 bytes an image on the web) once
        what is needed of them exists (stage 2's keyword bags); the titles stay for plots of examples."""
        empty = StringColumn(np.zeros(0, dtype=np.uint8), np.zeros(len(self) + 1, dtype=np.int64))
        self.descriptions, self.tags = empty, empty

    def source_names(self) -> np.ndarray:
        """str [N]: each image's source name (a numpy string array, not N Python objects)."""
        return np.array(SOURCES)[self.sources]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in (self.paths, self.labels, self.sources, self.queries, self.ranks,
                                      self.titles, self.descriptions, self.tags))


class TrainBuilder:
    """Collects training images one at a time (readers append) into `TrainColumns`."""

    def __init__(self):
        self.paths, self.titles, self.descriptions, self.tags = (StringBuilder() for _ in range(4))
        self.labels, self.sources, self.queries, self.ranks = array("i"), array("B"), array("i"), array("i")
        self._query_index: dict[tuple[str, str], int] = {}

    def append(self, path: str, label: int, source: str, query: str, rank: int | None = None, title: str = "",
               description: str = "", tags: str = "") -> None:
        key = (source, query)
        q = self._query_index.get(key)
        if q is None:
            q = self._query_index[key] = len(self._query_index)
        self.paths.append(path)
        self.labels.append(label)
        self.sources.append(SOURCES.index(source))
        self.queries.append(q)
        self.ranks.append(rank or 0)
        self.titles.append(title)
        self.descriptions.append(description)
        self.tags.append(tags)

    def finish(self) -> TrainColumns:
        """The columns, sharing the builder's memory: append nothing afterwards."""
        return TrainColumns(self.paths.finish(), array_column(self.labels, np.int32),
                            array_column(self.sources, np.uint8), array_column(self.queries, np.int32),
                            list(self._query_index), array_column(self.ranks, np.int32),
                            self.titles.finish(), self.descriptions.finish(), self.tags.finish())


# Joins on string columns: hash every string (vectorised over the buffer), match hashes by sorting,
# then compare the bytes of every matched pair, so a hash collision can never join two different
# strings. A Python dict from path to row would cost ~120 bytes an image (~2 GB at 16M).

_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_BASE = np.uint64(0x100000001B3)  # FNV's 64-bit prime: odd, so every power of it is non-zero mod 2**64
_BLOCK = 1 << 14  # strings per vectorised block: the per-byte temporaries (~50 bytes a byte) stay ~40 MB
# (measured on 1M paths: hashing 0.73 s at this size, 1.34 s with blocks of 1M strings)


def _splitmix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit reaches every output bit (a polynomial hash alone keeps
    the low bits of the bytes in the low bits of the hash)."""
    h = h ^ (h >> np.uint64(30))
    h = h * _MIX1
    h = h ^ (h >> np.uint64(27))
    h = h * _MIX2
    return h ^ (h >> np.uint64(31))


def _byte_positions(col: StringColumn, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the strings `index` of `col`: (owner [bytes]: position of the string in `index`, the byte's
    offset inside its string [bytes], the byte's position in `col.buffer` [bytes])."""
    starts, lengths = col.offsets[index], col.offsets[index + 1] - col.offsets[index]
    owner = np.repeat(np.arange(len(index), dtype=np.int64), lengths)
    first = np.zeros(len(index), dtype=np.int64)
    np.cumsum(lengths[:-1], out=first[1:])
    inside = np.arange(len(owner), dtype=np.int64) - first[owner]
    return owner, inside, starts[owner] + inside


def string_hashes(col: StringColumn) -> np.ndarray:
    """uint64 [N]: a 64-bit hash of each string (polynomial in its bytes, mixed with its length)."""
    out = np.empty(len(col), dtype=np.uint64)
    longest = int(col.lengths().max()) if len(col) else 0
    powers = np.cumprod(np.full(longest + 1, _BASE, dtype=np.uint64))
    with np.errstate(over="ignore"):  # arithmetic mod 2**64 is the point
        for lo in range(0, len(col), _BLOCK):
            index = np.arange(lo, min(lo + _BLOCK, len(col)), dtype=np.int64)
            owner, inside, position = _byte_positions(col, index)
            terms = (col.buffer[position].astype(np.uint64) + np.uint64(1)) * powers[inside]
            total = np.zeros(len(terms) + 1, dtype=np.uint64)
            np.cumsum(terms, out=total[1:])
            lengths = col.lengths()[index]
            ends = np.cumsum(lengths)
            sums = total[ends] - total[ends - lengths]  # each string's terms: they are contiguous
            out[lo:lo + len(index)] = _splitmix(sums ^ lengths.astype(np.uint64))
    return out


def strings_equal(a: StringColumn, ia: np.ndarray, b: StringColumn, ib: np.ndarray) -> np.ndarray:
    """bool [M]: whether string `a[ia[j]]` equals `b[ib[j]]`, byte for byte."""
    ia, ib = np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64)
    out = np.empty(len(ia), dtype=bool)
    for lo in range(0, len(ia), _BLOCK):
        ja, jb = ia[lo:lo + _BLOCK], ib[lo:lo + _BLOCK]
        same = (a.offsets[ja + 1] - a.offsets[ja]) == (b.offsets[jb + 1] - b.offsets[jb])
        owner, _, pa = _byte_positions(a, ja[same])
        _, _, pb = _byte_positions(b, jb[same])
        differs = np.bincount(owner, weights=a.buffer[pa] != b.buffer[pb], minlength=int(same.sum()))
        same[same] = differs == 0
        out[lo:lo + len(ja)] = same
    return out


def lookup(keys: StringColumn, queries: StringColumn, hashes=string_hashes) -> np.ndarray:
    """int64 [len(queries)]: the first row of `keys` holding each query's string, -1 where none does.
    `hashes` is the hash function (a test passes a bad one to force collisions)."""
    query_hash = key_hash = hashes(keys)
    order = np.argsort(key_hash, kind="stable")  # equal hashes keep row order: the first match is the first row
    key_hash = key_hash[order]
    if queries is not keys:
        query_hash = hashes(queries)
    lo = np.searchsorted(key_hash, query_hash, side="left")
    hi = np.searchsorted(key_hash, query_hash, side="right")
    found = np.full(len(queries), -1, dtype=np.int64)
    open_ = np.flatnonzero(hi > lo)
    step = 0
    while len(open_):  # one pass per candidate of the same hash: one pass unless hashes collide
        candidate = order[lo[open_] + step]
        match = strings_equal(keys, candidate, queries, open_)
        found[open_[match]] = candidate[match]
        step += 1
        open_ = open_[~match & (lo[open_] + step < hi[open_])]
    return found


def first_rows(col: StringColumn, hashes=string_hashes) -> np.ndarray:
    """int64 [N]: for each row, the first row holding the same string (itself unless it repeats one)."""
    return lookup(col, col, hashes)


def as_string_column(strings) -> StringColumn:
    return strings if isinstance(strings, StringColumn) else StringColumn.from_strings(strings)
