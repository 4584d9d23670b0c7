"""The WebVision reader on a hand-written data set in the published layout, with the damage web data
has: a broken JSON file, missing fields, non-UTF-8 bytes, a missing image, an unreadable image."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from megaclass.data import ClassBalancedSampler, ImageDataset, WebVisionFormatError, load_webvision


def _jpeg(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 12), colour).save(path)


@pytest.fixture()
def root(tmp_path):
    info = tmp_path / "info"
    info.mkdir()
    (info / "synsets.txt").write_text("n02012849 crane\nn03126707 crane\nn01440764 tench, Tinca tinca\n")
    (info / "queries_google.txt").write_text("1 crane\n3 tench\n")
    (info / "queries_flickr.txt").write_text("2 crane\n")
    (info / "train_filelist_google.txt").write_text(
        "google/q0001/aaa.jpg 0\ngoogle/q0001/bbb.jpg 0\ngoogle/q0001/gone.jpg 0\n"
        "google/q0003/ccc.jpg 2\ngoogle/q0003/ddd.jpg 2\n"
        "google/q0001/bad.jpg 7\nnot a line\n")
    (info / "train_filelist_flickr.txt").write_text("flickr/q0002/eee.jpg 1\nflickr/q0002/fff.jpg 1\n")
    (info / "val_filelist.txt").write_text("v1.jpg 0\nv2.jpg 2\nv3.jpg 1\n")
    for name in ("aaa", "bbb"):
        _jpeg(tmp_path / "google" / "q0001" / f"{name}.jpg", (200, 10, 10))
    for name in ("ccc", "ddd"):
        _jpeg(tmp_path / "google" / "q0003" / f"{name}.jpg", (10, 200, 10))
    for name in ("eee", "fff"):
        _jpeg(tmp_path / "flickr" / "q0002" / f"{name}.jpg", (10, 10, 200))
    for name in ("v1", "v2"):
        _jpeg(tmp_path / "val_images_256" / f"{name}.jpg", (90, 90, 90))
    # Not in rank order; bbb lacks its title.
    (tmp_path / "google" / "q0001.json").write_text(json.dumps([
        {"id": "bbb", "rank": 2, "description": "a crane &amp; its chick"},
        {"id": "aaa", "rank": 1, "title": "Crane at dusk", "description": "wading bird"},
        {"id": "gone", "rank": 3, "title": "x", "description": "y"},
    ]))
    (tmp_path / "google" / "q0003.json").write_text('[{"id": "ccc", "rank": 1, "title": "tench"')  # broken
    # Latin-1 bytes (not UTF-8) in fff's title; tags as a list.
    flickr = ('[{"id": "eee", "rank": 1, "title": "tower crane", "description": "", "tags": ["crane", "steel"]},'
              '{"id": "fff", "rank": "2", "title": "gr\xfcn", "description": "d", "tags": "x y"}]')
    (tmp_path / "flickr" / "q0002.json").write_bytes(flickr.encode("latin-1"))
    return tmp_path


def test_reader_loads_fields_and_counts_damage(root):
    wv = load_webvision(root)
    assert wv.synsets == [("n02012849", "crane"), ("n03126707", "crane"), ("n01440764", "tench, Tinca tinca")]
    by_path = {r.path: r for r in wv.train}
    assert sorted(by_path) == ["flickr/q0002/eee.jpg", "flickr/q0002/fff.jpg", "google/q0001/aaa.jpg",
                               "google/q0001/bbb.jpg", "google/q0003/ccc.jpg", "google/q0003/ddd.jpg"]
    a = by_path["google/q0001/aaa.jpg"]
    assert (a.label, a.source, a.query, a.rank, a.title, a.description, a.tags) == \
        (0, "google", "q0001", 1, "Crane at dusk", "wading bird", "")
    b = by_path["google/q0001/bbb.jpg"]
    assert (b.rank, b.title, b.description) == (2, "", "a crane &amp; its chick")
    e, f = by_path["flickr/q0002/eee.jpg"], by_path["flickr/q0002/fff.jpg"]
    assert (e.label, e.rank, e.tags) == (1, 1, "crane steel")
    assert f.rank == 2 and f.title == "gr\ufffdn" and f.tags == "x y"
    broken = by_path["google/q0003/ccc.jpg"]
    assert (broken.rank, broken.title, broken.label) == (None, "", 2)
    assert wv.query_text(a) == "crane" and wv.query_text(e) == "crane" and wv.query_text(broken) == "tench"
    assert wv.val == [("val_images_256/v1.jpg", 0), ("val_images_256/v2.jpg", 2)]
    assert dict(wv.skipped) == {
        "missing training image (dropped)": 1,
        "missing validation image (dropped)": 1,
        "label out of range": 1,
        "malformed filelist line": 1,
        "missing field 'title'": 1,
        "broken metadata JSON": 1,
        "image without metadata (kept, no side information)": 2,
        "non-UTF-8 metadata JSON (bad bytes replaced)": 1,
    }
    summary = wv.summary()
    assert "6 training images" in summary and "q0003.json:1" in summary and "gone.jpg" in summary


def test_image_check_lists_folders_without_a_stat_per_image(root, monkeypatch):
    """16M stat calls on a network file system take hours: the check may only list folders."""
    import os

    statted = []
    real_stat, real_scandir = os.stat, os.scandir

    class Entry:  # records what a DirEntry is asked about its file
        def __init__(self, entry):
            self.entry, self.name, self.path = entry, entry.name, entry.path

        def stat(self, **kw):
            statted.append(self.name)
            return self.entry.stat(**kw)

        def is_file(self, **kw):
            statted.append(self.name)  # a stat wherever the file system gives no d_type
            return self.entry.is_file(**kw)

        def is_symlink(self):  # answered from the listing's d_type (the confinement's link check)
            return self.entry.is_symlink()

    def scandir(path="."):
        return [Entry(e) for e in real_scandir(path)]

    def stat(path, *args, **kw):
        statted.append(os.fspath(path))
        return real_stat(path, *args, **kw)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "stat", stat)
    (root / "google" / "q0001" / "aaa.jpg").write_bytes(b"")  # empty: kept here, ImageDataset skips it
    wv = load_webvision(root)
    assert not [p for p in statted if p.endswith(".jpg")], statted
    assert "google/q0001/aaa.jpg" in [r.path for r in wv.train] and "gone.jpg" in wv.summary()


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(WebVisionFormatError, match="synsets.txt: missing"):
        load_webvision(tmp_path)
    (tmp_path / "info").mkdir()
    (tmp_path / "info" / "synsets.txt").write_text("n01440764 tench\n")
    with pytest.raises(WebVisionFormatError, match="no train_filelist"):
        load_webvision(tmp_path)


def test_image_dataset_serves_tensors_and_skips_unreadable(root):
    (root / "google" / "q0001" / "bbb.jpg").write_bytes(b"not a jpeg")
    wv = load_webvision(root)
    items = wv.train_items()
    bad = [p for p, _ in items].index("google/q0001/bbb.jpg")
    ds = ImageDataset(root, items, image_size=16, train=False)
    image, label, index = ds[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and index == 0
    # A solid (200, 10, 10) JPEG normalized with ImageNet's mean/std, by hand; JPEG rounding allows ±0.05.
    expected = torch.tensor([(200 / 255 - 0.485) / 0.229, (10 / 255 - 0.456) / 0.224, (10 / 255 - 0.406) / 0.225])
    torch.testing.assert_close(image.mean(dim=(1, 2)), expected, atol=0.05, rtol=0)
    assert image.std(dim=(1, 2)).max() < 0.05
    image, label, index = ds[bad]
    assert index == (bad + 1) % len(items) and label == items[index][1] and bad in ds.unreadable
    pre = ImageDataset(root, items, 16, train=True, preload=True)
    assert pre.unreadable == {bad} and pre[bad][2] != bad
    torch.manual_seed(0)
    assert pre[0][0].shape == (3, 16, 16)


def test_class_balanced_sampler_balances():
    labels = [0] * 90 + [1] * 10
    sampler = ClassBalancedSampler(labels, num_samples=20000, seed=3)
    draws = np.array(list(sampler))
    share = np.mean(np.array(labels)[draws] == 1)
    assert 0.47 < share < 0.53  # uniform over 2 classes; 20000 draws: std 0.0035
    assert set(draws[np.array(labels)[draws] == 1]) == set(range(90, 100))  # every image of the rare class
    assert list(ClassBalancedSampler(labels, 20000, seed=3)) == draws.tolist()  # same on every rank
    sampler.set_epoch(1)
    assert list(sampler) != draws.tolist()
