"""The columnar reader: the same records as a plain reading of the JSON files; tar shards in the pinned
format (index.json + KEY.json/KEY.jpg/KEY.cls, written here with webdataset's TarWriter) read into the
same columns as the JSON they were made from; `megaclass weights --data SHARDS` = `--data ROOT`."""
import json

import numpy as np
import pytest

from megaclass.data import WebVisionFormatError, load_webvision
from megaclass.data.columns import StringColumn, TrainRecord
from megaclass.data.metadata import load_metadata

SYNSETS = [("n02012849", "crane"), ("n03126707", "crane, machine"), ("n01440764", "tench")]


@pytest.fixture()
def root(tmp_path):
    """A small data set: Google and Flickr queries, missing fields, a rank as a string, a bad rank, a
    tag list, non-ASCII text, an image without metadata, a repeated path, a label out of range."""
    root = tmp_path / "data"
    info = root / "info"
    info.mkdir(parents=True)
    (info / "synsets.txt").write_text("".join(f"{w} {t}\n" for w, t in SYNSETS))
    (info / "queries_google.txt").write_text("1 crane bird\n3 tench\n")
    (info / "queries_flickr.txt").write_text("2 tower crane\n")
    (info / "train_filelist_google.txt").write_text(
        "google/q0001/a.jpg 0\ngoogle/q0001/b.jpg 0\ngoogle/q0001/c.jpg 0\ngoogle/q0003/d.jpg 2\n"
        "google/q0001/a.jpg 0\ngoogle/q0001/z.jpg 9\n")
    (info / "train_filelist_flickr.txt").write_text("flickr/q0002/e.jpg 1\nflickr/q0002/f.jpg 1\n")
    (info / "val_filelist.txt").write_text("v1.jpg 0\nv2.jpg 2\n")
    (root / "google").mkdir()
    (root / "flickr").mkdir()
    (root / "google" / "q0001.json").write_text(json.dumps([
        {"id": "b", "rank": "2", "description": "grüne Kraniche &amp; Küken"},
        {"id": "a", "rank": 1, "title": "Crane at dusk", "description": "wading bird"},
        {"id": "c", "rank": -4, "title": "x", "description": "y"}]))
    (root / "google" / "q0003.json").write_text(json.dumps([{"id": "zzz", "rank": 1}]))  # d has no entry
    (root / "flickr" / "q0002.json").write_text(json.dumps([
        {"id": "e", "rank": 1, "title": "tower crane", "description": "", "tags": ["crane", "steel"]},
        {"id": "f", "rank": 2, "title": "t", "description": "d"}]))
    return root


def _plain_reading(root):
    """The expected training records, read with nothing but json and str.split (independent of the reader)."""
    classes = len((root / "info" / "synsets.txt").read_text().splitlines())
    queries = {s: {int(n): t for n, t in (line.split(" ", 1) for line in
                                          (root / "info" / f"queries_{s}.txt").read_text().splitlines())}
               for s in ("google", "flickr")}
    records, seen = [], set()
    for source in ("google", "flickr"):
        for line in (root / "info" / f"train_filelist_{source}.txt").read_text().splitlines():
            path, label = line.split()
            if path in seen or not 0 <= int(label) < classes:
                continue
            seen.add(path)
            query, name = path.split("/")[1], path.split("/")[2][:-4]
            entry = {e["id"]: e for e in json.loads((root / source / f"{query}.json").read_text())}.get(name, {})
            rank = entry.get("rank")
            rank = int(rank) if rank is not None and int(rank) > 0 else None
            tags = entry.get("tags", "") if source == "flickr" else ""
            records.append(TrainRecord(path, int(label), source, query, rank, entry.get("title", ""),
                                       entry.get("description", ""), " ".join(tags) if isinstance(tags, list) else tags))
    return records, queries


def test_columns_hold_what_a_plain_reading_of_the_json_finds(root):
    wv = load_webvision(root, check_images=False)
    expected, queries = _plain_reading(root)
    assert len(wv.train) == len(expected) == 6
    assert list(wv.train) == expected and [wv.train[i] for i in range(6)] == expected and wv.train[-1] == expected[-1]
    assert wv.train.paths.tolist() == [r.path for r in expected]
    assert wv.train.labels.tolist() == [r.label for r in expected]
    assert wv.train.ranks.tolist() == [r.rank or 0 for r in expected]
    assert wv.train.titles[0] == "Crane at dusk" and wv.train.descriptions[1] == "grüne Kraniche &amp; Küken"
    assert [wv.query_text(r) for r in expected] == [queries[r.source].get(int(r.query[1:]), "") for r in expected]
    assert wv.train_items() == [(r.path, r.label) for r in expected]
    assert list(wv.train[2:5]) == expected[2:5]  # a slice is columns too
    assert wv.skipped["duplicate filelist line (first kept)"] == 1 and wv.skipped["label out of range"] == 1
    assert wv.skipped["field 'rank' not a positive integer (rank unknown)"] == 1
    assert "google 4" in wv.summary() and "flickr 2" in wv.summary()


def test_string_column_take_and_round_trip():
    strings = ["", "crane", "grüne Küken", "", "x" * 300, "鶴"]
    column = StringColumn.from_strings(strings)
    assert column.tolist() == strings and [column[i] for i in range(6)] == strings
    assert column.take(np.array([5, 0, 2, 2])).tolist() == ["鶴", "", "grüne Küken", "grüne Küken"]
    assert column.lengths().tolist() == [len(s.encode()) for s in strings]


def test_string_builder_column_is_the_utf8_bytes_and_the_builder_starts_again():
    """The column is the strings' UTF-8 bytes end to end with offsets at their boundaries (built here by
    hand); a lone surrogate is replaced; after `finish` the builder is empty and its next column is
    separate from the first."""
    from megaclass.data.columns import StringBuilder

    builder = StringBuilder()
    for s in ["crane", "", "鶴", "a\ud800b"]:
        builder.append(s)
    first = builder.finish()
    assert first.buffer.tobytes() == b"crane" + "鶴".encode() + b"a?b"
    assert first.offsets.tolist() == [0, 5, 5, 8, 11] and first.buffer.dtype == np.uint8
    builder.append("heron")
    second = builder.finish()
    assert second.tolist() == ["heron"] and first.tolist() == ["crane", "", "鶴", "a?b"]
    assert len(builder.finish()) == 0 and builder.finish().buffer.nbytes == 0


def test_take_in_blocks_equals_indexing(monkeypatch):
    monkeypatch.setattr(StringColumn, "TAKE_BLOCK", 3)  # 10 strings taken: the last block short
    strings = ["", "crane", "grüne Küken", "", "x" * 300, "鶴"]
    index = [5, 0, 2, 2, 4, 3, 1, 1, 0, 5]
    assert StringColumn.from_strings(strings).take(np.array(index)).tolist() == [strings[i] for i in index]


def _write_shards(root, out, per_shard=4):
    """Shards in the pinned format (HELPERS/docs: index.json + KEY.jpg/.json/.cls) from the plain reading."""
    import webdataset as wds

    records, queries = _plain_reading(root)
    out.mkdir()
    splits = {}
    val = [(f"val_images_256/{p}", int(y)) for p, y in
           (line.split() for line in (root / "info" / "val_filelist.txt").read_text().splitlines())]
    samples = {"train": [dict(path=r.path, wnid=SYNSETS[r.label][0], label=r.label, source=r.source,
                              query=queries[r.source].get(int(r.query[1:]), ""), rank=r.rank, title=r.title,
                              description=r.description, tags=r.tags) for r in records],
               "val": [dict(path=p, wnid=SYNSETS[y][0], label=y, source="val", query="", rank=None, title="",
                            description="", tags="") for p, y in val]}
    for split, items in samples.items():
        shards = []
        for s, lo in enumerate(range(0, len(items), per_shard)):
            name = f"{split}-{s:06d}.tar"
            with wds.TarWriter(str(out / name)) as sink:
                for i, item in enumerate(items[lo:lo + per_shard]):
                    sink.write({"__key__": f"{s:05d}{i:04d}", "jpg": b"\xff\xd8 not decoded here",
                                "json": json.dumps(item).encode(), "cls": str(item["label"]).encode()})
            shards.append({"name": name, "samples": len(items[lo:lo + per_shard])})
        splits[split] = {"samples": len(items), "shards": shards}
    return splits


def test_shards_read_into_the_same_columns_as_the_json(root, tmp_path):
    wv = load_webvision(root, check_images=False)
    shards = tmp_path / "shards"
    splits = _write_shards(root, shards)
    (shards / "index.json").write_text(json.dumps({"format": "megaclass-shards", "version": 1,
                                                   "classes": [list(c) for c in SYNSETS], "splits": splits,
                                                   "skipped": dict(wv.skipped)}))
    from_shards = load_metadata(shards)
    assert list(from_shards.train) == list(wv.train)
    for column in ("paths", "titles", "descriptions", "tags"):
        assert getattr(from_shards.train, column) == getattr(wv.train, column)
    for column in ("labels", "sources", "ranks"):
        np.testing.assert_array_equal(getattr(from_shards.train, column), getattr(wv.train, column))
    assert from_shards.val == wv.val and from_shards.synsets == wv.synsets
    assert from_shards.skipped == wv.skipped
    assert [from_shards.query_text(r) for r in from_shards.train] == [wv.query_text(r) for r in wv.train]


def test_shard_damage_is_counted_and_a_bad_index_refused(root, tmp_path):
    import webdataset as wds

    shards = tmp_path / "shards"
    splits = _write_shards(root, shards)
    with wds.TarWriter(str(shards / "train-000009.tar")) as sink:
        sink.write({"__key__": "000090000", "json": b"{broken"})
        sink.write({"__key__": "000090001", "json": json.dumps({"path": "../../etc/passwd", "label": 0}).encode()})
        sink.write({"__key__": "000090002", "json": json.dumps({"path": "google/q0009/n.jpg", "label": 1,
                                                                 "source": "google", "rank": True}).encode()})
    splits["train"]["shards"] += [{"name": "train-000009.tar", "samples": 3}, {"name": "train-000010.tar", "samples": 5}]
    index = {"format": "megaclass-shards", "version": 1, "classes": [list(c) for c in SYNSETS], "splits": splits}
    (shards / "index.json").write_text(json.dumps(index))
    wv = load_metadata(shards)
    assert len(wv.train) == 7 and wv.train[-1].rank is None and wv.train[-1].title == ""
    assert wv.skipped["broken sample JSON in a shard (dropped)"] == 1
    assert wv.skipped["path outside the data root (dropped, never opened)"] == 1
    assert wv.skipped["field 'rank' not a positive integer (rank unknown)"] == 1
    assert wv.skipped["missing field 'title'"] == 1 and "train-000010.tar" in wv.examples["unreadable shard (its images dropped)"]
    for bad in ({**index, "version": 2}, {**index, "classes": []},
                {**index, "splits": {"train": {"shards": [{"name": "../x.tar"}]}}}):
        (shards / "index.json").write_text(json.dumps(bad))
        with pytest.raises(WebVisionFormatError, match="index.json"):
            load_metadata(shards)


def test_weights_from_shards_equal_weights_from_the_json(root, tmp_path):
    """`megaclass weights --data SHARDS` (index.json detected) writes the same OUT_TSV as `--data ROOT`."""
    from megaclass.cli import main

    for name in ("a", "b", "c", "d", "e", "f"):  # the JSON reader checks image files by default
        (root / ("google/q0003" if name == "d" else "flickr/q0002" if name in "ef" else "google/q0001")).mkdir(
            parents=True, exist_ok=True)
    for path in ("google/q0001/a.jpg", "google/q0001/b.jpg", "google/q0001/c.jpg", "google/q0003/d.jpg",
                 "flickr/q0002/e.jpg", "flickr/q0002/f.jpg"):
        (root / path).write_bytes(b"")
    shards = tmp_path / "shards"
    splits = _write_shards(root, shards)
    (shards / "index.json").write_text(json.dumps({"format": "megaclass-shards", "version": 1,
                                                   "classes": [list(c) for c in SYNSETS], "splits": splits}))
    knn = tmp_path / "knn.tsv"
    knn.write_text("n02012849\tn03126707\t0.8\nn03126707\tn02012849\t0.8\nn01440764\tn02012849\t0.1\n")
    pred = tmp_path / "pred.tsv"
    pred.write_text("google/q0001/a.jpg\tn02012849:0.9\ngoogle/q0001/b.jpg\tn03126707:0.6 n02012849:0.3\n"
                    "google/q0001/c.jpg\tn01440764:0.7\ngoogle/q0003/d.jpg\tn01440764:0.8\n"
                    "flickr/q0002/e.jpg\tn03126707:0.9\nflickr/q0002/f.jpg\tn02012849:0.5\n")
    outs = []
    for data in (root, shards):
        out = tmp_path / f"w_{data.name}.tsv"
        assert main(["weights", "--data", str(data), "--knn", str(knn), "--predictions", str(pred), "--stage", "1",
                     "--out", str(out), "--no-plot"]) == 0
        outs.append(out.read_text())
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == 6


def _dict_first_rows(strings):
    first = {}
    return [first.setdefault(s, i) for i, s in enumerate(strings)]


@pytest.mark.parametrize("buckets", [None, 1, 3])
def test_joins_equal_a_dict_even_when_every_hash_collides(buckets):
    """`lookup` and `first_rows` against a plain dict; with `buckets` the hash is cut to that many values,
    so nearly every pair of strings collides and only the byte comparison keeps the join right."""
    from megaclass.data.columns import first_rows, lookup, string_hashes, strings_equal

    hashes = string_hashes if buckets is None else (lambda col: string_hashes(col) % np.uint64(buckets))
    rng = np.random.default_rng(1)
    pool = ["", "a", "b", "ab", "ba", "aa", "é", "e\u0301", "google/q0001/a.jpg", "google/q0001/a.jpq",
            "flickr/q0002/日本.jpg", "x" * 300]
    keys = [pool[i] for i in rng.integers(0, len(pool), 40)]
    queries = [pool[i] for i in rng.integers(0, len(pool), 60)] + ["missing", "abc"]
    key_col, query_col = StringColumn.from_strings(keys), StringColumn.from_strings(queries)
    first = {}
    for i, s in enumerate(keys):
        first.setdefault(s, i)
    assert lookup(key_col, query_col, hashes).tolist() == [first.get(q, -1) for q in queries]
    assert first_rows(key_col, hashes).tolist() == _dict_first_rows(keys)
    ia, ib = rng.integers(0, 40, 100), rng.integers(0, 62, 100)
    assert strings_equal(key_col, ia, query_col, ib).tolist() == [keys[a] == queries[b] for a, b in zip(ia, ib)]


def test_hashes_depend_on_the_bytes_only():
    from megaclass.data.columns import string_hashes

    a = StringColumn.from_strings(["x", "heron", "", "crane"])
    b = StringColumn.from_strings(["crane", "heron", "", "longer prefix"])
    ha, hb = string_hashes(a), string_hashes(b)
    assert ha[1] == hb[1] and ha[2] == hb[2] and ha[3] == hb[0]
    assert len(set(ha.tolist())) == 4  # different strings, different hashes (here)


def test_string_column_iterates_in_blocks_as_the_strings_were():
    strings = ["", "crane", "é€", "", "x" * 70, "日本", "a"] * 3
    col = StringColumn.from_strings(strings)
    assert list(col.__iter__(block=4)) == strings and list(col) == strings  # 21 strings: the last block short
    assert list(StringColumn.from_strings([])) == []
