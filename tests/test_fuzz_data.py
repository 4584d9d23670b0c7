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
    ("img.jpg\tn01440764:0.7 n01443537:0.5", r"pred.tsv:2: probabilities sum to 1.2, above 1 by more than"),
    ("img.jpg\tn01440764:0.4 n01440764:0.4", r"pred.tsv:2: class n01440764 named twice"),
])
def test_7_predictions_summing_above_1_or_naming_a_class_twice_are_errors(tmp_path, row, message):
    path = tmp_path / "pred.tsv"
    path.write_text("ok.jpg\tn01440764:0.5 n01443537:0.499999 n01484850:0.000002\n" + row + "\n")
    with pytest.raises(TableError, match=message):
        read_predictions(path, WNIDS)
    path.write_text("ok.jpg\tn01440764:0.333334 n01443537:0.333334 n01484850:0.333334\n")  # rounding: fine
    assert read_predictions(path, WNIDS).probs.shape == (1, 3)


# -- 8: command-line numbers -------------------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["semantics", "--synsets", "s.txt", "--k", "3", "--out", "o", "--block-size", "-5"], "--block-size"),
    (["semantics", "--synsets", "s.txt", "--k", "3", "--out", "o", "--block-size", "0"], "--block-size"),
    (["semantics", "--synsets", "s.txt", "--k", "0", "--out", "o"], "--k"),
    (["semantics", "--synsets", "s.txt", "--k", "3", "--out", "o", "--alpha", "nan"], "--alpha"),
    (["semantics", "--synsets", "s.txt", "--k", "3", "--out", "o", "--alpha", "1.5"], "--alpha"),
    (["synth", "--out", "o", "--classes", "-3"], "--classes"),
    (["synth", "--out", "o", "--seed", "-1"], "--seed"),
    (["bench", "ce", "--n", "0"], "--n"),
    (["bench", "ce", "--chunk-size", "-1"], "--chunk-size"),
    (["bench", "ce", "--repeats", "inf"], "--repeats"),
    (["bench", "knn", "--block-size", "0"], "--block-size"),
    (["bench", "knn", "--rate-seconds=-inf"], "--rate-seconds"),
    (["bench", "weights", "--images", "-10"], "--images"),
    (["bench", "train", "--ranks", "0"], "--ranks"),
])
def test_8_bad_numbers_on_the_command_line_are_argparse_errors(tmp_path, monkeypatch, capsys, argv, flag):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_8_the_knn_search_refuses_a_block_size_below_1():
    import torch

    from megaclass.semantics.knn import embedding_knn

    with pytest.raises(ValueError, match="block_size must be a positive integer, got -5"):
        embedding_knn(torch.eye(4), 2, block_size=-5)


# -- 9: config values checked where they are read, before any process group ----------------------
@pytest.mark.parametrize("override, message", [
    ("optim.lr=.inf", "optim.lr: must be a finite number, got inf"),
    ("optim.lr=.nan", "optim.lr: must be a finite number, got nan"),
    ("train.epochs=.inf", "train.epochs: must be a finite number"),
    ("parallel.timeout_s=.inf", "parallel.timeout_s: must be a finite number"),
    ("parallel.timeout_s=1.0e+300", "parallel.timeout_s: must be in (0, 31536000] seconds"),
    ("optim.momentum=-1", "optim.momentum: must be in [0, 1), got -1.0"),
    ("optim.momentum=.nan", "optim.momentum: must be a finite number"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1]: must be in [0, 1), got 1.0"),
    ("optim.betas=[-0.1, 0.999]", "optim.betas[0]: must be in [0, 1), got -0.1"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay: must be >= 0"),
    ("head.lr_scale=.inf", "head.lr_scale: must be a finite number"),
    ("train.seed=-1", "train.seed: must be in [0, 2**32)"),
    ("optim.lr=" + "9" * 400, "optim.lr: must be a finite number"),
    ("model.name=resnet_tinny", "model.name: unknown model 'resnet_tinny'"),
    ("model.checkpoint=/nonexistent/backbone.pt", "model.checkpoint: no such file: /nonexistent/backbone.pt"),
    ("optim.lr=[", "--set 'optim.lr=[': the value is not valid YAML"),
])
def test_9_config_numbers_names_and_files_are_checked_where_read(tmp_path, override, message):
    from megaclass.engine.config import ConfigError, load_config

    path = tmp_path / "run.yaml"
    path.write_text("run_dir: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert message in str(err.value)
    assert str(path) in str(err.value) or message.startswith("--set")  # an override is named, not the file


@pytest.mark.parametrize("content, message", [
    (b"- model\n- data\n", "the top level must be a mapping of sections"),
    (b"run_dir: caf\xe9\n", "not UTF-8 text (byte 12"),
    (b"[" * 100_000, "run.yaml"),
])
def test_9_a_config_that_is_not_a_utf8_mapping_names_its_file(tmp_path, content, message):
    from megaclass.engine.config import ConfigError, load_config

    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    for overrides in ([], ["train.epochs=2"]):
        with pytest.raises(ConfigError, match="run.yaml") as err:
            load_config(path, overrides)
        assert message in str(err.value)


@pytest.mark.parametrize("override", ["model.name=nope", "optim.lr=.inf", "run_dir=FILE/run"])
def test_9_bad_config_values_fail_before_the_process_group_starts(tmp_path, override):
    import torch.distributed as dist

    from megaclass.engine.data import start_run

    (tmp_path / "FILE").write_text("")
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{root: {tmp_path}}}\n")
    with pytest.raises((ValueError, OSError), match="model.name|optim.lr|run_dir"):
        start_run(str(path), [override.replace("FILE", str(tmp_path / "FILE"))])
    assert not dist.is_initialized()


# -- 10: damaged checkpoints ---------------------------------------------------------------------
def _damaged_checkpoints(rank, world, root):
    import shutil

    import torch

    from engine_helpers import FlatLinear, random_items
    from megaclass.engine import checkpoint
    from megaclass.engine.config import config_from_dict
    from megaclass.engine.trainer import TrainData, Trainer

    os.environ["LOCAL_RANK"] = str(rank)
    cfg = config_from_dict({"run_dir": f"{root}/run", "data": {"num_workers": 0},
                            "train": {"micro_batch_size": 4, "max_steps": 1, "progress": False}})
    items = random_items(8, 5)
    trainer = Trainer(cfg, TrainData(items, 5, items.labels), backbone=FlatLinear(48, 4))
    trainer.fit()
    ckpt_root = f"{root}/run/checkpoints"
    good = checkpoint.latest_checkpoint(ckpt_root)

    def truncate(path, keep=0.5):
        data = open(path, "rb").read()
        open(path, "wb").write(data[: int(len(data) * keep)])

    cases = {
        "head shard truncated": lambda f: truncate(glob_one(f"{f}/head/shard-*.pt")),
        "model states empty": lambda f: truncate(f"{f}/ds/mp_rank_00_model_states.pt", 0),
        "model states truncated": lambda f: truncate(f"{f}/ds/mp_rank_00_model_states.pt", 0.9),
        "meta without num_classes": lambda f: open(f"{f}/meta.json", "w").write('{"step": 1, "world_size": 1}'),
        "meta truncated": lambda f: truncate(f"{f}/meta.json"),
        "ds removed": lambda f: shutil.rmtree(f"{f}/ds"),
    }

    def glob_one(pattern):
        import glob

        return glob.glob(pattern)[0]

    errors = {}
    for name, damage in cases.items():
        folder = f"{root}/damaged/{name.replace(' ', '_')}"
        shutil.copytree(good, folder)
        damage(folder)
        try:
            checkpoint.load(folder, trainer.engine, trainer.head, trainer.head_optimizer, trainer.class_range, 5)
            errors[name] = None
        except Exception as exc:  # the test asserts the type and the message
            errors[name] = (type(exc).__name__, str(exc))
    step = checkpoint.load(good, trainer.engine, trainer.head, trainer.head_optimizer, trainer.class_range, 5)
    trainer.close()
    return errors, step


def test_10_a_damaged_checkpoint_names_the_file_and_what_is_wrong(tmp_path):
    from dist_utils import run_ranks

    [(errors, step)] = run_ranks(_damaged_checkpoints, 1, str(tmp_path))
    assert step == 1  # the undamaged checkpoint loads
    expected = {
        "head shard truncated": (r"head/shard-\d+\.pt", "not a complete torch.save file"),
        "model states empty": ("ds/mp_rank_00_model_states.pt", "empty (0 bytes)"),
        "model states truncated": ("ds/mp_rank_00_model_states.pt", "not a complete torch.save file"),
        "meta without num_classes": ("meta.json", "'num_classes' missing"),
        "meta truncated": ("meta.json", "not JSON"),
        "ds removed": ("/ds", "missing"),
    }
    import re

    for name, (where, what) in expected.items():
        assert errors[name] is not None, name
        kind, message = errors[name]
        assert kind == "CheckpointError" and re.search(where, message) and what in message, (name, message)


@pytest.mark.parametrize("tag", ["../../other/checkpoints/step-00000001", "/abs/step-00000001", "..", "", "linked"])
def test_10_latest_must_name_a_folder_of_its_own_checkpoints(tmp_path, tag):
    from megaclass.engine import checkpoint

    other = tmp_path / "other" / "checkpoints" / "step-00000001"
    other.mkdir(parents=True)
    (other / "meta.json").write_text('{"step": 1, "world_size": 1, "num_classes": 5}')
    root = tmp_path / "runs" / "mine" / "checkpoints"
    root.mkdir(parents=True)
    (root / "linked").symlink_to(other)  # a step folder of this run that is another run's
    (root / "latest").write_text(tag)
    with pytest.raises(checkpoint.CheckpointError, match="latest: names .* not a checkpoint folder of"):
        checkpoint.latest_checkpoint(str(root))


# -- 11: outputs checked before the work ---------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["weights", "--data", "NOWHERE", "--knn", "k", "--predictions", "p", "--stage", "1", "--out", "DIR"], "--out"),
    (["weights", "--data", "NOWHERE", "--knn", "k", "--predictions", "p", "--stage", "1", "--out", "FILE/w.tsv"],
     "--out"),
    (["bench", "ce", "--json", "FILE/x.json"], "--json"),
    (["bench", "ce", "--json", "DIR"], "--json"),
    (["bench", "knn", "--out", "FILE/x.json"], "--out"),
    (["bench", "weights", "--out", "FILE/x.json"], "--out"),
    (["bench", "train", "--out", "FILE/x.json"], "--out"),
    (["semantics", "--synsets", "NOWHERE", "--k", "3", "--out", "FILE/o"], "--out"),
    (["semantics", "--synsets", "NOWHERE", "--k", "3", "--out", "o", "--cache", "FILE"], "--cache"),
    (["semantics", "--select-webvision2", "FILE/s.txt"], "--select-webvision2"),
    (["synth", "--out", "FILE/data"], "--out"),
    (["synth", "--out", "FILE"], "--out"),
])
def test_11_every_command_checks_its_outputs_before_the_work(tmp_path, monkeypatch, capsys, argv, flag):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("a file, not a folder")
    (tmp_path / "DIR").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {flag}: " in err and ("FILE" in err or "DIR" in err), err


def test_11_check_writable_refuses_a_read_only_folder_and_creates_nothing(tmp_path):
    from megaclass.io import check_writable

    assert check_writable(tmp_path / "new" / "deeper" / "w.tsv", "--out") == tmp_path / "new" / "deeper" / "w.tsv"
    assert list(tmp_path.iterdir()) == []  # nothing created by the check
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="--out .*locked/w.tsv: cannot create files in"):
            check_writable(locked / "w.tsv", "--out")
    finally:
        locked.chmod(0o755)


def test_9_a_float_in_yaml_exponent_notation_is_a_number(tmp_path):
    from megaclass.engine.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("optim: {weight_decay: 5e-4, lr: 1E-2}\n")  # PyYAML reads both as strings
    cfg = load_config(path)
    assert (cfg.optim.weight_decay, cfg.optim.lr) == (5e-4, 1e-2)


# -- 7 (with the shared synsets reader): a bad synsets.txt is blamed, not the predictions -------
@pytest.mark.parametrize("synsets, ok", [
    ("\ufeffn01440764 class 0\nn01443537 class 1\nn01484850 class 2\n", True),  # a BOM: read as the wnid
    ("n01440764\tclass 0\nn01443537\tclass 1\nn01484850\tclass 2\n", True),  # tabs separate like spaces
    ("n01440764 class 0\nn01443537 class 1\nn01440764 class 2\n", False),  # a duplicate shifts class indices
    ("n01440764 class 0\nn0144353 class 1\nn01484850 class 2\n", False),  # not a wnid
])
def test_7_megaclass_weights_names_the_synsets_file_for_a_bad_one(tmp_path, capsys, synsets, ok):
    root = _dataset(tmp_path / "data", [])
    (root / "info" / "synsets.txt").write_text(synsets, encoding="utf-8")
    code, out = _weights_run(tmp_path, root)
    err = capsys.readouterr().err
    if ok:
        assert code == 0 and len(out.read_text().splitlines()) == 6
    else:
        assert code == 2 and ("synsets.txt:3" in err or "synsets.txt:2" in err), err
        assert "pred.tsv" not in err and not out.exists()
