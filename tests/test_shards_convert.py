"""`megaclass shards`: the pinned format read back with Python's own tarfile (the sample indexes
included), damage counted as the reader counts it, a conversion killed halfway then rerun ends
byte-identical to a clean one, and the reader's errors for shards and indexes that disagree with index.json."""
import hashlib
import json
import logging
import os
import tarfile

import numpy as np

import pytest
from engine_helpers import write_webvision

from megaclass.cli import main
from megaclass.data import load_webvision
from megaclass.data import shards as shards_module
from megaclass.data.shards import NOT_AN_IMAGE, convert


def _damaged_set(root):
    write_webvision(str(root), classes=3, per_class=7, val_per_class=2, size=16)
    (root / "google/q0001/0_3.jpg").write_bytes(b"not an image at all")  # opens as nothing
    os.remove(root / "google/q0002/1_0.jpg")  # missing: load_webvision drops and counts it
    with open(root / "google/q0001.json", "w") as f:  # metadata for class 0's query, one entry without rank
        json.dump([{"id": "0_1", "rank": 2, "title": "t", "description": "d"}, {"id": "0_2", "title": "x"}], f)
    return str(root)


def _read_tar(path):
    """{key: {extension: bytes}} in tar order, with the standard library's reader."""
    out = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def test_shards_hold_the_original_bytes_and_side_information_in_the_pinned_format(tmp_path, capsys):
    root = _damaged_set(tmp_path / "wv")
    assert main(["shards", "--data", root, "--out", str(tmp_path / "out"), "--per-shard", "5", "--workers", "2"]) == 0
    data = load_webvision(root)
    index = json.loads((tmp_path / "out/index.json").read_text())
    assert index["format"] == "megaclass-shards" and index["version"] == 1
    assert all(set(s) == {"name", "samples", "bytes", "index"} for s in index["splits"]["train"]["shards"])
    assert index["classes"] == [list(c) for c in data.synsets]
    # 20 listed training records (one missing) in shards of 5 records: the record that is not an image leaves 4
    train = index["splits"]["train"]
    assert [(s["name"], s["samples"]) for s in train["shards"]] == \
        [("train-000000.tar", 4), ("train-000001.tar", 5), ("train-000002.tar", 5), ("train-000003.tar", 5)]
    assert train["samples"] == 19 and index["splits"]["val"]["samples"] == 6
    assert [s["name"] for s in index["splits"]["val"]["shards"]] == ["val-000000.tar", "val-000001.tar"]
    expected_skips = dict(data.skipped)
    expected_skips[NOT_AN_IMAGE] = 1
    assert index["skipped"] == expected_skips
    assert index["skipped"]["missing training image (dropped)"] == 1 and index["skipped"]["missing field 'rank'"] == 1

    records = [r for r in data.train if r.path != "google/q0001/0_3.jpg"]
    seen = []
    for number, shard in enumerate(train["shards"]):
        samples = _read_tar(tmp_path / "out" / shard["name"])
        assert len(samples) == shard["samples"] and shard["bytes"] == os.path.getsize(tmp_path / "out" / shard["name"])
        for i, (key, parts) in enumerate(samples.items()):
            assert key == f"{number:06d}{i:04d}" and set(parts) == {"jpg", "json", "cls"}
            seen.append((parts, json.loads(parts["json"])))
    for record, (parts, meta) in zip(records, seen, strict=True):
        assert parts["jpg"] == open(os.path.join(root, record.path), "rb").read()  # no re-encode
        assert int(parts["cls"].decode("ascii")) == record.label
        assert meta == {"path": record.path, "wnid": data.wnids[record.label], "label": record.label,
                        "source": record.source, "query": data.query_text(record), "rank": record.rank,
                        "title": record.title, "description": record.description, "tags": record.tags}
    first = seen[0][1]
    assert first["path"] == "google/q0001/0_0.jpg" and first["rank"] is None  # no metadata entry: kept, no rank
    assert seen[1][1]["rank"] == 2 and seen[1][1]["title"] == "t"
    val = [m for s in index["splits"]["val"]["shards"] for m in _read_tar(tmp_path / "out" / s["name"]).values()]
    assert [(json.loads(m["json"])["path"], int(m["cls"])) for m in val] == data.val
    assert all(json.loads(m["json"])["source"] == "val" and json.loads(m["json"])["rank"] is None for m in val)
    assert '"train": 19' in capsys.readouterr().out


class _Killed(Exception):
    pass


def test_a_conversion_killed_halfway_resumes_to_the_clean_result_keeping_finished_shards(tmp_path, monkeypatch):
    root = write_webvision(str(tmp_path / "wv"), classes=3, per_class=7, val_per_class=2, size=16)
    clean = convert(root, tmp_path / "clean", per_shard=4, progress=False)

    real_format, calls = shards_module._image_format, []

    def dies_at_the_tenth_image(data):
        calls.append(1)
        if len(calls) == 10:  # inside the third shard
            raise _Killed
        return real_format(data)

    monkeypatch.setattr(shards_module, "_image_format", dies_at_the_tenth_image)
    with pytest.raises(_Killed):
        convert(root, tmp_path / "run", per_shard=4, progress=False)
    monkeypatch.setattr(shards_module, "_image_format", real_format)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == [".progress", "train-000000.idx", "train-000000.tar",
                                                     "train-000001.idx", "train-000001.tar"]  # no index, no temp file
    kept = {name: os.stat(out / name).st_mtime_ns for name in ("train-000000.tar", "train-000001.tar")}
    with open(out / "train-000001.tar", "r+b") as f:  # a finished shard damaged since: its size gives it away
        f.truncate(1024)
    kept.pop("train-000001.tar")

    again = convert(root, out, per_shard=4, progress=False)
    assert again == clean
    assert {name: os.stat(out / name).st_mtime_ns for name in kept} == kept  # finished shards not rewritten
    def same_as_clean():
        names = sorted(n for n in os.listdir(tmp_path / "clean") if n.endswith((".tar", ".idx")) or n == "index.json")
        assert sorted(n for n in os.listdir(out) if n.endswith((".tar", ".idx")) or n == "index.json") == names
        for name in names:
            assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name

    same_as_clean()
    # finished shards whose sample index is lost or damaged since (as the reader would refuse it): rewritten
    # with it, the others kept
    (out / "train-000002.idx").unlink()
    damaged = bytearray((out / "train-000003.idx").read_bytes())
    damaged[-1] ^= 1
    (out / "train-000003.idx").write_bytes(bytes(damaged))
    kept = {name: os.stat(out / name).st_mtime_ns for name in ("train-000000.tar", "train-000004.tar")}
    assert convert(root, out, per_shard=4, progress=False) == clean
    assert {name: os.stat(out / name).st_mtime_ns for name in kept} == kept
    same_as_clean()

    # another --per-shard: every shard rewritten to the new plan, none of the old layout left
    other = convert(root, out, per_shard=100, progress=False)
    assert [s["name"] for s in other["splits"]["train"]["shards"]] == ["train-000000.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    assert sorted(p.name for p in out.glob("*.idx")) == ["train-000000.idx", "val-000000.idx"]
    assert len(_read_tar(out / "train-000000.tar")) == 21


def test_the_reader_names_a_missing_index_and_a_shard_that_disagrees_with_it(tmp_path):
    from megaclass.data.shards import ShardFormatError, load_shards

    with pytest.raises(ShardFormatError, match="index.json: missing"):
        load_shards(tmp_path)
    root = write_webvision(str(tmp_path / "wv"), classes=2, per_class=5, val_per_class=1, size=16)
    convert(root, tmp_path / "out", per_shard=4, progress=False)
    assert len(load_shards(tmp_path / "out").columns["train"]) == 10
    shard = tmp_path / "out/train-000001.tar"
    samples = list(_read_tar(shard))
    with tarfile.open(shard) as tar:  # cut after the second sample's members: a whole tar, one sample short
        keep = [m for m in tar.getmembers() if m.name.split(".")[0] in samples[:2]]
        end = keep[-1].offset_data + -(-keep[-1].size // 512) * 512
    data = shard.read_bytes()[:end] + b"\0" * 1024
    shard.write_bytes(data)
    with pytest.raises(ShardFormatError, match=f"train-000001.tar: {len(data)} bytes, index.json says "):
        load_shards(tmp_path / "out")
    (tmp_path / "out/index.json").write_text('{"format": "webdataset"}')
    with pytest.raises(ShardFormatError, match="not a megaclass-shards version 1 index"):
        load_shards(tmp_path / "out")


def test_the_sample_index_holds_the_byte_ranges_labels_and_paths_tarfile_reads(tmp_path):
    from PIL import Image

    from megaclass.data.shards import load_shards, read_shard_index

    root = _damaged_set(tmp_path / "wv")
    # a PNG (stored as KEY.png, after KEY.json in the tar) and a path that is not ASCII
    Image.new("RGB", (16, 16), (9, 99, 199)).save(tmp_path / "wv/google/q0002/1_3.jpg", format="PNG")
    filelist = tmp_path / "wv/info/train_filelist_google.txt"
    os.rename(tmp_path / "wv/google/q0003/2_1.jpg", tmp_path / "wv/google/q0003/2_1é.jpg")
    filelist.write_text(filelist.read_text().replace("2_1.jpg", "2_1é.jpg"))
    index = convert(root, tmp_path / "out", per_shard=5, progress=False)
    shards = load_shards(tmp_path / "out")
    assert shards.classes == [tuple(c) for c in index["classes"]]
    for split in ("train", "val"):
        expected = []  # (shard, offset, size, label, path) from tarfile, in tar order
        for number, entry in enumerate(index["splits"][split]["shards"]):
            with tarfile.open(tmp_path / "out" / entry["name"]) as tar:
                members = {}
                for member in tar:
                    key, ext = member.name.split(".", 1)
                    members.setdefault(key, {})[ext] = member, tar.extractfile(member).read()
            for key, parts in members.items():
                (image, data), = [v for ext, v in parts.items() if ext not in ("json", "cls")]
                meta = json.loads(parts["json"][1])
                expected.append((number, image.offset_data, image.size, int(parts["cls"][1]), meta["path"]))
                with open(tmp_path / "out" / entry["name"], "rb") as f:
                    f.seek(image.offset_data)
                    assert f.read(image.size) == data
            sidecar = (tmp_path / "out" / entry["index"]["name"]).read_bytes()
            assert entry["index"]["bytes"] == len(sidecar)
            assert entry["index"]["sha256"] == hashlib.sha256(sidecar).hexdigest()
        columns = shards.columns[split]
        got = list(zip(columns.shard.tolist(), columns.offset.tolist(), columns.size.tolist(), columns.label.tolist(),
                       columns.paths.tolist()))
        assert got == expected
    assert "google/q0002/1_3.jpg" in shards.columns["train"].paths.tolist()
    assert "google/q0003/2_1é.jpg" in shards.columns["train"].paths.tolist()
    assert any(n.endswith(".png") for n in tarfile.open(tmp_path / "out/train-000001.tar").getnames())
    entry = index["splits"]["train"]["shards"][0]
    offsets, _, labels, paths = read_shard_index(tmp_path / "out" / entry["index"]["name"], entry["index"],
                                                 entry["samples"], entry["bytes"], 3)
    assert len(offsets) == len(labels) == len(paths) == entry["samples"]


def test_a_folder_without_sample_indexes_is_scanned_to_the_same_columns(tmp_path, caplog):
    from megaclass.data.shards import load_shards

    root = write_webvision(str(tmp_path / "wv"), classes=3, per_class=5, val_per_class=1, size=16)
    convert(root, tmp_path / "out", per_shard=4, progress=False)
    new = load_shards(tmp_path / "out")
    index = json.loads((tmp_path / "out/index.json").read_text())
    for split in index["splits"].values():  # as `megaclass shards` wrote it before sample indexes existed
        for shard in split["shards"]:
            os.remove(tmp_path / "out" / shard.pop("index")["name"])
    (tmp_path / "out/index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.INFO, logger="megaclass.data.shards"):
        old = load_shards(tmp_path / "out")
    assert [r.getMessage() for r in caplog.records if "no sample index" in r.getMessage()] == [
        f"{tmp_path / 'out'}: 5 shards have no sample index and were scanned instead (slow at millions of images); "
        "rerun `megaclass shards` on this folder to write the indexes"]
    for split in ("train", "val"):
        a, b = new.columns[split], old.columns[split]
        for name in ("shard", "offset", "size", "label"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), (split, name)
        assert a.paths.tolist() == b.paths.tolist()
    assert old.sizes == new.sizes and old.files == new.files
    # the rerun the message asks for writes the indexes, and the folder then reads without a scan
    assert convert(root, tmp_path / "out", per_shard=4, progress=False)["splits"]["train"]["shards"][0]["index"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="megaclass.data.shards"):
        load_shards(tmp_path / "out")
    assert not caplog.records


def test_a_damaged_replaced_or_inconsistent_sample_index_is_a_clear_error(tmp_path):
    from megaclass.data.shards import ShardFormatError, index_bytes, load_shards, read_shard_index

    root = write_webvision(str(tmp_path / "wv"), classes=2, per_class=5, val_per_class=1, size=16)
    convert(root, tmp_path / "out", per_shard=4, progress=False)
    out = tmp_path / "out"
    sidecar = out / "train-000001.idx"
    good = sidecar.read_bytes()
    damaged = bytearray(good)
    damaged[-3] ^= 0xFF  # a flipped byte in the paths
    sidecar.write_bytes(bytes(damaged))
    with pytest.raises(ShardFormatError, match="train-000001.idx: .* size or SHA-256 differs from index.json's"):
        load_shards(out)
    sidecar.write_bytes((out / "train-000000.idx").read_bytes())  # another shard's index
    with pytest.raises(ShardFormatError, match="train-000001.idx: .* size or SHA-256 differs"):
        load_shards(out)
    sidecar.unlink()
    with pytest.raises(ShardFormatError, match="train-000001.idx: unreadable sample index .*rerun `megaclass shards`"):
        load_shards(out)
    sidecar.write_bytes(good)
    load_shards(out)

    # files that match their entry but not their shard: each named, with what is wrong
    index = json.loads((out / "index.json").read_text())
    entry = index["splits"]["train"]["shards"][1]

    def check(data, samples=entry["samples"], tar_bytes=entry["bytes"], classes=2):
        bad = tmp_path / "bad.idx"
        bad.write_bytes(data)
        read_shard_index(bad, {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, samples, tar_bytes,
                         classes)

    from megaclass.data.columns import StringColumn

    paths = StringColumn.from_strings(["a", "b"])
    with pytest.raises(ShardFormatError, match="bad.idx: 2 samples, index.json says 4"):
        check(index_bytes([1024, 2048], [5, 5], [0, 1], paths))
    with pytest.raises(ShardFormatError, match="bad.idx: an image byte range outside the tar's 4096 bytes"):
        check(index_bytes([1024, 4000], [5, 500], [0, 1], paths), samples=2, tar_bytes=4096)
    with pytest.raises(ShardFormatError, match=r"bad.idx: a label outside 0..1"):
        check(index_bytes([1024, 2048], [5, 5], [0, 2], paths), samples=2)
    with pytest.raises(ShardFormatError, match="bad.idx: not a sample index"):
        check(good[:200])
    with pytest.raises(ShardFormatError, match="bad.idx: not a sample index"):
        check(b"x" * 300)


def test_verify_finds_a_sample_index_that_matches_index_json_but_not_its_tar(tmp_path, capsys):
    from megaclass.data.shards import index_bytes, load_shards, read_shard_index

    root = write_webvision(str(tmp_path / "wv"), classes=2, per_class=5, val_per_class=1, size=16)
    convert(root, tmp_path / "out", per_shard=4, progress=False)
    out = tmp_path / "out"
    assert main(["shards", "--verify", str(out)]) == 0
    assert "12 samples, every sample index agrees with its shard" in capsys.readouterr().out
    # shard 1's index with its first two samples' byte ranges swapped, and index.json updated to match it:
    # the start-up checks pass, the deep check does not
    index = json.loads((out / "index.json").read_text())
    entry = index["splits"]["train"]["shards"][1]
    offsets, sizes, labels, paths = read_shard_index(out / entry["index"]["name"], entry["index"], entry["samples"],
                                                     entry["bytes"], 2)
    offsets, sizes = offsets.copy(), sizes.copy()
    offsets[[0, 1]], sizes[[0, 1]] = offsets[[1, 0]], sizes[[1, 0]]
    forged = index_bytes(offsets, sizes, labels, paths)
    (out / entry["index"]["name"]).write_bytes(forged)
    entry["index"].update(bytes=len(forged), sha256=hashlib.sha256(forged).hexdigest())
    (out / "index.json").write_text(json.dumps(index))
    load_shards(out)
    assert main(["shards", "--verify", str(out)]) == 2
    assert "train-000001.idx: byte ranges, labels or paths differ from what train-000001.tar holds" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["shards", "--out", str(out)])  # converting needs --data
