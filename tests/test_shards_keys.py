"""An image's key on shards is its original path, held as the index's string column (no str per image):
data.weights joins by it and PRED_TSV is written from it, exactly as on the files the shards came from."""
import random

import numpy as np
import pytest
import torch
from engine_helpers import write_webvision

from megaclass.data.columns import StringColumn
from megaclass.data.shards import convert
from megaclass.engine.config import config_from_dict
from megaclass.engine.data import load_run_data
from megaclass.weighting.tables import read_predictions, write_predictions, write_weights


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(files root, shard folder, {path: weight}) with the weights file's rows in a shuffled order."""
    root = tmp_path_factory.mktemp("keys")
    write_webvision(str(root / "wv"), classes=4, per_class=12, val_per_class=1, size=16)
    convert(root / "wv", root / "shards", per_shard=10, progress=False)
    lines = (root / "wv/info/train_filelist_google.txt").read_text().splitlines()
    paths = [line.split()[0] for line in lines]
    random.Random(3).shuffle(paths)
    table = {p: round(0.1 + 0.05 * i, 2) for i, p in enumerate(paths)}
    write_weights(root / "weights.tsv", list(table), list(table.values()))
    return root / "wv", root / "shards", table


def _data(source, weights, limit=0):
    where = {"root": str(source)} if source.name == "wv" else {"shards": str(source)}
    cfg = config_from_dict({"run_dir": "unused", "data": {**where, "weights": str(weights), "image_size": 16,
                                                           "num_workers": 0, "limit_train": limit}})
    return load_run_data(cfg)


@pytest.mark.parametrize("limit", [0, 17])  # 17: a subset, the table's other rows allowed
def test_weights_join_by_key_on_shards_as_on_files(sources, limit):
    files_root, shard_dir, table = sources
    files, shards = _data(files_root, files_root.parent / "weights.tsv", limit), _data(shard_dir, files_root.parent / "weights.tsv", limit)
    assert isinstance(shards.paths, StringColumn)  # the index's column itself
    assert list(shards.paths) == files.paths and len(files.paths) == (limit or 48)
    expected = torch.tensor([table[p] for p in files.paths], dtype=torch.float32)
    assert torch.equal(files.sample_weights, expected) and torch.equal(shards.sample_weights, expected)


def test_a_missing_weight_on_shards_names_the_image(sources, tmp_path):
    files_root, shard_dir, table = sources
    dropped = sorted(table)[5]
    write_weights(tmp_path / "short.tsv", [p for p in table if p != dropped], [w for p, w in table.items() if p != dropped])
    with pytest.raises(ValueError, match=f"no weight for 1 training images, e.g. '{dropped}'"):
        _data(shard_dir, tmp_path / "short.tsv")


def test_predictions_from_the_shards_keys_are_the_files_rows(sources, tmp_path):
    files_root, shard_dir, _ = sources
    files, shards = _data(files_root, files_root.parent / "weights.tsv"), _data(shard_dir, files_root.parent / "weights.tsv")
    n, wnids = len(files.paths), shards.wnids
    rng = np.random.default_rng(0)
    classes = np.stack([rng.permutation(4)[:3] for _ in range(n)])
    classes[4, 2] = -1  # a row with fewer classes
    probs = np.sort(rng.dirichlet(np.ones(4), n)[:, :3], axis=1)[:, ::-1].astype(np.float32)
    write_predictions(tmp_path / "files.tsv", files.paths, wnids, classes, probs)
    write_predictions(tmp_path / "shards.tsv", shards.paths, wnids, classes, probs, block=7)  # blocks across rows
    text = (tmp_path / "shards.tsv").read_text()
    assert text == (tmp_path / "files.tsv").read_text()
    rows = text.splitlines()
    assert len(rows) == n and rows[0].split("\t")[0] == files.paths[0]
    assert rows[4] == f"{files.paths[4]}\t{wnids[classes[4, 0]]}:{probs[4, 0]:.6f} {wnids[classes[4, 1]]}:{probs[4, 1]:.6f}"
    read = read_predictions(tmp_path / "shards.tsv", wnids)
    assert list(read.paths) == files.paths and np.array_equal(read.classes, classes)
    named = classes >= 0
    assert read.probs[~named].tolist() == [0.0]
    assert np.abs(read.probs - probs)[named].max() <= 5e-7 + 6e-8  # six decimals, then float32
    with pytest.raises(ValueError, match=f"{n} paths but {n - 1} rows of classes"):
        write_predictions(tmp_path / "bad.tsv", shards.paths, wnids, classes[:-1], probs)
