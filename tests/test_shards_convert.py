"""`megaclass shards`: the pinned format read back with Python's own tarfile, damage counted as the
reader counts it, and a conversion killed halfway then rerun ends byte-identical to a clean one."""
import json
import os
import tarfile

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
    assert sorted(p.name for p in out.iterdir()) == [".progress", "train-000000.tar", "train-000001.tar"]  # no index, no temp file
    kept = {name: os.stat(out / name).st_mtime_ns for name in ("train-000000.tar", "train-000001.tar")}
    with open(out / "train-000001.tar", "r+b") as f:  # a finished shard damaged since: its size gives it away
        f.truncate(1024)
    kept.pop("train-000001.tar")

    again = convert(root, out, per_shard=4, progress=False)
    assert again == clean
    assert {name: os.stat(out / name).st_mtime_ns for name in kept} == kept  # finished shards not rewritten
    for name in os.listdir(tmp_path / "clean"):
        if name.endswith(".tar") or name == "index.json":
            assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name

    # another --per-shard: every shard rewritten to the new plan, none of the old layout left
    other = convert(root, out, per_shard=100, progress=False)
    assert [s["name"] for s in other["splits"]["train"]["shards"]] == ["train-000000.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    assert len(_read_tar(out / "train-000000.tar")) == 21


def test_the_reader_names_a_missing_index_and_a_shard_that_disagrees_with_it(tmp_path):
    from megaclass.data.shards import ShardFormatError, load_shards

    with pytest.raises(ShardFormatError, match="index.json: missing"):
        load_shards(tmp_path)
    root = write_webvision(str(tmp_path / "wv"), classes=2, per_class=5, val_per_class=1, size=16)
    convert(root, tmp_path / "out", per_shard=4, progress=False)
    assert len(load_shards(tmp_path / "out").samples["train"]) == 10
    shard = tmp_path / "out/train-000001.tar"
    samples = list(_read_tar(shard))
    with tarfile.open(shard) as tar:  # cut after the second sample's members: a whole tar, one sample short
        keep = [m for m in tar.getmembers() if m.name.split(".")[0] in samples[:2]]
        end = keep[-1].offset_data + -(-keep[-1].size // 512) * 512
    data = shard.read_bytes()[:end] + b"\0" * 1024
    shard.write_bytes(data)
    with pytest.raises(ShardFormatError, match="train-000001.tar: holds 2 samples, index.json says 4"):
        load_shards(tmp_path / "out")
    (tmp_path / "out/index.json").write_text('{"format": "webdataset"}')
    with pytest.raises(ShardFormatError, match="not a megaclass-shards version 1 index"):
        load_shards(tmp_path / "out")
