"""Issue 11, items 5-11 replayed: bad input as a new user meets it, each case on a tiny input.

Every case must end in a counted skip or in a clear error naming the file / argument / line, never
a traceback from deep inside, and nothing outside the data root may ever be opened. (Items 1-4, the
op, are in test_fuzz_op.py.)
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import zlib

import pytest
from PIL import Image

from megaclass.cli import main
from megaclass.data import ImageDataset, load_webvision
from megaclass.data.webvision import OUTSIDE
from megaclass.weighting.tables import TableError, read_predictions

WNIDS = ["n01440764", "n01443537", "n01484850"]

# -- nothing outside the root is opened: every `open` of the process is audited -----------------
_OPENED: list[str] | None = None


def _audit(event, args):
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # cannot be removed: it records only while a test sets _OPENED


@contextlib.contextmanager
def recording_opens():
    """Yields the list of every path the process opens inside the block."""
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def _image(path, colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _dataset(root, train_lines, metadata=None, val_lines=()):
    """A WebVision-layout root: 3 classes, google images q0001/a..f (metadata rank 1..6), and the
    given extra filelist lines."""
    info = root / "info"
    info.mkdir(parents=True)
    (info / "synsets.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(WNIDS)))
    names = "abcdef"
    for n in names:
        _image(root / "google" / "q0001" / f"{n}.jpg")
    lines = [f"google/q0001/{n}.jpg {i % 3}" for i, n in enumerate(names)] + list(train_lines)
    (info / "train_filelist_google.txt").write_text("\n".join(lines) + "\n")
    entries = [{"id": n, "rank": i + 1, "title": "t", "description": "d"} for i, n in enumerate(names)]
    (root / "google" / "q0001.json").write_text(metadata if metadata is not None else json.dumps(entries))
    if val_lines:
        (root / "val_images_256").mkdir()
        (info / "val_filelist.txt").write_text("\n".join(val_lines) + "\n")
    return root


def _weights_run(tmp_path, root, predictions=None):
    """`megaclass weights --stage 1` on `root` with a knn.tsv and predictions made by hand."""
    knn = tmp_path / "knn.tsv"
    knn.write_text("".join(f"{a}\t{b}\t0.5\n" for a in WNIDS for b in WNIDS if a != b))
    pred = tmp_path / "pred.tsv"
    pred.write_text(predictions if predictions is not None else
                    "".join(f"google/q0001/{n}.jpg\t{WNIDS[i % 3]}:0.7 {WNIDS[(i + 1) % 3]}:0.2\n"
                            for i, n in enumerate("abcdef")))
    out = tmp_path / "out" / "w.tsv"
    code = main(["weights", "--data", str(root), "--knn", str(knn), "--predictions", str(pred), "--stage", "1",
                 "--out", str(out), "--no-plot"])
    return code, out


# -- 5: paths leave the data root ----------------------------------------------------------------
def test_5_paths_outside_the_root_are_dropped_counted_and_never_opened(tmp_path):
    outside = tmp_path / "other"
    _image(outside / "x.jpg")
    (outside / "q0009").mkdir()
    _image(outside / "q0009" / "y.jpg")
    root = tmp_path / "data"
    _dataset(root, ["../other/x.jpg 0", "google/../../other/x.jpg 1", "/etc/passwd 0", str(outside / "x.jpg") + " 0",
                    "google/q0001/link.jpg 0", "google/q0009/y.jpg 2", "./google/q0001/a.jpg 0"],
             val_lines=["../../other/x.jpg 0"])
    (root / "google" / "q0001" / "link.jpg").symlink_to(outside / "x.jpg")  # a link out of the root
    (root / "google" / "q0009").symlink_to(outside / "q0009")  # a folder linked out of the root
    (root / "google" / "q0009.json").symlink_to(outside / "q0009.json")
    with recording_opens() as opened:
        wv = load_webvision(root)
        # the dataset checks again before it opens a file, whoever built its items
        ds = ImageDataset(root, [("google/q0001/link.jpg", 0), ("../other/x.jpg", 0), ("google/q0001/a.jpg", 1)],
                          image_size=8, train=False)
        _, label, index = ds[0]
        code, out = _weights_run(tmp_path, root)  # megaclass weights writes no row for them
    assert opened and not [p for p in opened if str(outside) in os.path.realpath(p)], opened
    assert sorted(r.path for r in wv.train) == [f"google/q0001/{n}.jpg" for n in "abcdef"]
    assert wv.val == []
    assert wv.skipped[OUTSIDE] == 8  # 5 lexical, the linked file, the linked folder, the val line
    assert wv.skipped["metadata JSON outside the data root (not read)"] == 1
    assert (label, index) == (1, 2) and ds.unreadable == {0, 1}
    assert code == 0
    assert sorted(line.split("\t")[0] for line in out.read_text().splitlines()) == \
        [f"google/q0001/{n}.jpg" for n in "abcdef"]


def test_5_an_info_file_linked_out_of_the_root_is_refused(tmp_path):
    root = _dataset(tmp_path / "data", [])
    elsewhere = tmp_path / "synsets.txt"
    (root / "info" / "synsets.txt").rename(elsewhere)
    (root / "info" / "synsets.txt").symlink_to(elsewhere)
    with pytest.raises(ValueError, match=r"synsets.txt: resolves to .* outside the data root"):
        load_webvision(root)


# -- 6: tracebacks instead of a counted skip --------------------------------------------------
@pytest.mark.parametrize("rank", ["Infinity", "1e400", "-Infinity", "NaN", "1" + "0" * 5000])
def test_6_a_rank_that_is_not_a_number_python_can_hold_is_counted(tmp_path, rank):
    metadata = '[{"id": "a", "rank": %s, "title": "t", "description": "d"}]' % rank
    root = _dataset(tmp_path / "data", [], metadata=metadata)
    wv = load_webvision(root)
    a = next(r for r in wv.train if r.path == "google/q0001/a.jpg")
    counted = wv.skipped["field 'rank' not a positive integer (rank unknown)"] + wv.skipped["broken metadata JSON"]
    assert a.rank is None and counted == 1, wv.summary()
    code, out = _weights_run(tmp_path, root)
    assert code == 0 and len(out.read_text().splitlines()) == 6


def test_6_json_nested_100000_deep_is_broken_metadata(tmp_path):
    root = _dataset(tmp_path / "data", [], metadata="[" * 100_000 + "]" * 100_000)
    wv = load_webvision(root)
    assert wv.skipped["broken metadata JSON"] == 1 and "q0001.json" in wv.examples["broken metadata JSON"]
    assert len(wv.train) == 6 and all(r.rank is None for r in wv.train)


def _png_header(path, width, height):
    """A PNG whose header declares width × height (PIL reads only the header at open)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_6_a_decompression_bomb_is_named_and_counted(tmp_path, caplog):
    _png_header(tmp_path / "bomb.jpg", 30_000, 30_000)
    _image(tmp_path / "ok.jpg")
    for preload in (False, True):
        ds = ImageDataset(tmp_path, [("bomb.jpg", 0), ("ok.jpg", 1)], image_size=8, train=False, preload=preload)
        image, label, index = ds[0]
        assert (tuple(image.shape), label, index) == ((3, 8, 8), 1, 1) and ds.unreadable == {0}
    assert "bomb.jpg" in caplog.text and "DecompressionBombError" in caplog.text


def test_6_a_label_like_superscript_two_is_a_counted_malformed_line(tmp_path):
    root = _dataset(tmp_path / "data", ["google/q0001/a.jpg ²", "google/q0001/b.jpg ٣"])
    wv = load_webvision(root)
    assert wv.skipped["malformed filelist line"] == 2
    assert "train_filelist_google.txt:7:" in wv.examples["malformed filelist line"]


def test_6_a_query_number_like_superscript_two_is_ignored(tmp_path):
    root = _dataset(tmp_path / "data", [])
    (root / "info" / "queries_google.txt").write_text("² squared\n1 fish\n")
    wv = load_webvision(root)
    assert wv.queries["google"] == {1: "fish"} and wv.query_text(wv.train[0]) == "fish"


# -- 7: duplicates, ranks, predictions ---------------------------------------------------------
def test_7_duplicate_filelist_lines_keep_the_first_and_are_counted(tmp_path):
    root = _dataset(tmp_path / "data", ["google/q0001/a.jpg 0", "google/q0001/b.jpg 2"])
    (root / "info" / "train_filelist_flickr.txt").write_text("google/q0001/c.jpg 1\n")
    wv = load_webvision(root)
    labels = {r.path: r.label for r in wv.train}
    assert len(wv.train) == 6 and labels["google/q0001/b.jpg"] == 1 and labels["google/q0001/c.jpg"] == 2
    assert wv.skipped["duplicate filelist line (first kept)"] == 1
    assert wv.skipped["duplicate filelist line with another label (first kept)"] == 2
    assert "train_filelist_google.txt:2" in wv.examples["duplicate filelist line with another label (first kept)"]
    code, out = _weights_run(tmp_path, root)  # one row per image, as training requires
    rows = [line.split("\t")[0] for line in out.read_text().splitlines()]
    assert code == 0 and len(rows) == len(set(rows)) == 6


def test_7_duplicate_metadata_ids_keep_the_first_and_are_counted(tmp_path):
    metadata = json.dumps([{"id": "a", "rank": 1, "title": "first", "description": ""},
                           {"id": "a", "rank": 9, "title": "second", "description": ""}])
    wv = load_webvision(_dataset(tmp_path / "data", [], metadata=metadata))
    a = next(r for r in wv.train if r.path == "google/q0001/a.jpg")
    assert (a.rank, a.title) == (1, "first") and wv.skipped["duplicate metadata id (first kept)"] == 1


def test_7_a_rank_must_be_a_positive_integer(tmp_path):
    ranks = {"a": True, "b": 2.7, "c": 0, "d": -5, "e": 3.0, "f": "4"}
    metadata = json.dumps([{"id": k, "rank": v, "title": "", "description": ""} for k, v in ranks.items()])
    wv = load_webvision(_dataset(tmp_path / "data", [], metadata=metadata))
    got = {r.path.split("/")[-1][0]: r.rank for r in wv.train}
    assert got == {"a": None, "b": None, "c": None, "d": None, "e": 3, "f": 4}
    assert wv.skipped["field 'rank' not a positive integer (rank unknown)"] == 4


@pytest.mark.parametrize("row, message", [
    ("img.jpg\tn01440764:0.7 n01443537:0.5", r"pred.tsv:2: probabilities sum to 1.200000 > 1"),
    ("img.jpg\tn01440764:0.4 n01440764:0.4", r"pred.tsv:2: class n01440764 named twice"),
])
def test_7_predictions_summing_above_1_or_naming_a_class_twice_are_errors(tmp_path, row, message):
    path = tmp_path / "pred.tsv"
    path.write_text("ok.jpg\tn01440764:0.5 n01443537:0.499999 n01484850:0.000002\n" + row + "\n")
    with pytest.raises(TableError, match=message):
        read_predictions(path, WNIDS)
    path.write_text("ok.jpg\tn01440764:0.333334 n01443537:0.333334 n01484850:0.333334\n")  # rounding: fine
    assert read_predictions(path, WNIDS).probs.shape == (1, 3)
