"""The synthetic data set: exact WebVision layout, determinism, and the noise model it promises."""
import filecmp
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megaclass.cli import main
from megaclass.data import load_webvision
from megaclass.data.synth import NOISE_KINDS, SynthConfig, generate, read_truth
from megaclass.semantics.wordnet import synset_of

SMALL = dict(classes=16, per_class=40, val_per_class=2, image_size=16, seed=5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "a"
    summary = generate(root, SynthConfig(**SMALL), progress=False)
    return root, summary


def test_layout_reads_back_completely(data):
    root, summary = data
    for name in ("synsets.txt", "train_filelist_google.txt", "train_filelist_flickr.txt", "val_filelist.txt",
                 "queries_google.txt", "queries_flickr.txt", "queries_synsets_map.txt"):
        assert (root / "info" / name).is_file(), name
    wv = load_webvision(root)
    assert wv.num_classes == 16 and len(wv.val) == 32 and len(wv.train) == summary["train_images"]
    assert all(reason.startswith("missing field") for reason in wv.skipped), wv.summary()
    assert {r.source for r in wv.train} == {"google", "flickr"}
    assert all(r.path.startswith(f"{r.source}/q{r.label + 1:04d}/") for r in wv.train)
    entries = json.loads((root / "flickr" / "q0001.json").read_text())
    assert all(isinstance(e["tags"], list) for e in entries)
    ranks = [e["rank"] for e in entries if "rank" in e]
    assert ranks != sorted(ranks)  # as published: not in rank order
    for wnid, text in wv.synsets:  # real WordNet 3.0 categories, named by their lemmas
        assert synset_of(wnid).lemma_names()[0].replace("_", " ") == text.split(", ")[0]


def test_truth_file_and_noise_model(data):
    root, summary = data
    wv = load_webvision(root)
    truth = read_truth(root)
    assert set(truth) == {r.path for r in wv.train}
    wnids = set(wv.wnids)
    ranks, wrong, flickr = [], [], []
    for r in wv.train:
        t = truth[r.path]
        assert t.kind in ("clean",) + NOISE_KINDS and t.clean == (t.kind == "clean")
        if t.clean:
            assert t.true_wnid == wv.wnids[r.label]
        elif t.kind == "outlier":
            assert t.true_wnid not in wnids
        else:
            assert t.true_wnid in wnids and t.true_wnid != wv.wnids[r.label]
        if r.rank is not None:
            ranks.append(r.rank), wrong.append(not t.clean), flickr.append(r.source == "flickr")
    ranks, wrong, flickr = map(np.array, (ranks, wrong, flickr))
    assert 0.25 < wrong.mean() < 0.5  # web-like: about a third wrong
    assert wrong[ranks <= 5].mean() + 0.15 < wrong[ranks >= 15].mean()  # grows with rank
    assert wrong[~flickr].mean() < wrong[flickr].mean()  # Google cleaner than Flickr
    assert {t.kind for t in truth.values()} == {"clean", *NOISE_KINDS}


def test_confusable_categories(data):
    root, _ = data
    wv = load_webvision(root)
    queries = [line.split(" ", 1)[1] for line in (root / "info" / "queries_google.txt").read_text().splitlines()]
    shared = {q for q in queries if queries.count(q) > 1}
    assert shared, "expected at least one name shared by two senses (e.g. crane)"
    for q in shared:
        senses = [wv.wnids[c] for c, name in enumerate(queries) if name == q]
        for wnid in senses:
            assert q.replace(" ", "_").lower() in {n.lower() for n in synset_of(wnid).lemma_names()}
    hypernyms = [synset_of(w).hypernyms()[0] for w in wv.wnids]
    assert len(set(hypernyms)) < len(hypernyms)  # WordNet siblings among the classes


def test_deterministic_for_a_seed(data, tmp_path):
    """Same seed, same bytes, also from another process with another string-hash seed."""
    root, _ = data
    again = tmp_path / "b"
    code = (f"from megaclass.data.synth import SynthConfig, generate; "
            f"generate({str(again)!r}, SynthConfig(**{SMALL!r}), progress=False)")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    for name in ("info/train_filelist_google.txt", "info/synsets.txt", "google/q0003.json", "truth_train.tsv"):
        assert filecmp.cmp(root / name, again / name, shallow=False), name
    first = (root / "info" / "train_filelist_flickr.txt").read_text().split()[0]
    assert (root / first).read_bytes() == (again / first).read_bytes()
    other = tmp_path / "c"
    generate(other, SynthConfig(**{**SMALL, "seed": 6, "classes": 4, "per_class": 4}), progress=False)
    assert (other / "info" / "train_filelist_google.txt").read_text() != \
        (root / "info" / "train_filelist_google.txt").read_text()


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "x"), "--classes", "1"]) == 2
    assert "classes must be in [2, 900], got 1" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["synth", "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_out_appears_only_when_complete(tmp_path, monkeypatch):
    """A run killed part-way leaves no `--out` (nothing a later run could mistake for a data set); one
    that fails cleans up after itself; `--out` may be an empty folder, replaced by the result."""
    import megaclass.data.synth as synth

    out = tmp_path / "data"
    save, calls = synth._save_jpeg, []

    def save_then_fail(array, path):
        assert not out.exists()  # a SIGKILL here would leave no `out` behind
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        save(array, path)

    monkeypatch.setattr(synth, "_save_jpeg", save_then_fail)
    tiny = SynthConfig(classes=2, per_class=4, val_per_class=1, image_size=8, seed=0)
    with pytest.raises(KeyboardInterrupt):
        generate(out, tiny, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synth, "_save_jpeg", save)
    out.mkdir()
    generate(out, tiny, progress=False)
    assert load_webvision(out).num_classes == 2 and list(tmp_path.iterdir()) == [out]
