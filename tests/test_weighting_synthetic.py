"""Both stages end to end (`megaclass weights`) on a small synthetic data set.

Predictions come from an independent, controlled source rather than a trained model
(`megaclass.bench.suite.simulated_predictions`): the class an image really shows is the top-1 with
probability 0.7, and a noisy image's wrong label is the top-1 with probability 0.3 (memorized).
"""
import numpy as np
import pytest

from megaclass.bench.suite import simulated_predictions as controlled_predictions
from megaclass.cli import main
from megaclass.data import load_webvision
from megaclass.data.synth import SynthConfig, generate, read_truth
from megaclass.semantics import nearest_categories, write_knn_tsv
from megaclass.weighting import read_weights, roc_auc, write_predictions


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    root = folder / "data"
    generate(root, SynthConfig(classes=16, per_class=50, val_per_class=1, image_size=16, seed=1), progress=False)
    wv = load_webvision(root)
    neighbors, scores = nearest_categories(wv.wnids, k=5)
    write_knn_tsv(folder / "knn.tsv", wv.wnids, neighbors, scores)
    truth = read_truth(root)
    for stage, seed in ((1, 0), (2, 1)):  # stage 2 sees another model's predictions (the stage-1 model's)
        classes, probs = controlled_predictions(wv, truth, seed)
        write_predictions(folder / f"pred{stage}.tsv", [r.path for r in wv.train], wv.wnids, classes, probs)
    out = {}
    for stage in (1, 2):
        args = ["weights", "--data", str(root), "--knn", str(folder / "knn.tsv"),
                "--predictions", str(folder / f"pred{stage}.tsv"), "--stage", str(stage), "--out", str(folder / f"w{stage}.tsv")]
        assert main(args + (["--stage1", str(folder / "w1.tsv")] if stage == 2 else [])) == 0
        out[stage] = read_weights(folder / f"w{stage}.tsv")
    return folder, wv, truth, out


def test_every_training_image_gets_a_weight(run):
    folder, wv, _, out = run
    listed = [line.split()[0] for s in ("google", "flickr")
              for line in (folder / "data" / "info" / f"train_filelist_{s}.txt").read_text().splitlines()]
    for stage in (1, 2):
        assert sorted(out[stage]) == sorted(listed)
        assert all(0 < w < 1 for w in out[stage].values())
        assert (folder / f"w{stage}.png").stat().st_size > 10_000


def test_weights_separate_clean_from_noisy_and_stage2_does_better(run):
    _, wv, truth, out = run
    clean = np.array([truth[r.path].clean for r in wv.train])
    auc = {stage: roc_auc(np.array([out[stage][r.path] for r in wv.train]), clean) for stage in (1, 2)}
    assert auc[1] > 0.7, auc  # chance 0.5; memorized noisy images look clean to stage 1
    assert auc[2] > 0.85 and auc[2] > auc[1] + 0.05, auc


def test_a_page_that_says_nothing_keeps_its_stage1_weight(run):
    """Pages without keywords once the query's words are gone (or only words too rare to encode)."""
    from megaclass.weighting.keywords import KeywordExtractor
    from megaclass.weighting.stage2 import Stage2Config, image_keywords
    from megaclass.weighting.text import select_vocabulary

    _, wv, _, out = run
    kw = image_keywords(KeywordExtractor(), [r.title for r in wv.train], [r.description for r in wv.train],
                        [r.tags for r in wv.train], [wv.query_text(r) or wv.synsets[r.label][1] for r in wv.train])
    keep = select_vocabulary(kw, Stage2Config().min_df, Stage2Config().max_vocabulary)
    silent = [r.path for r, ks in zip(wv.train, kw) if not set(ks) & keep]
    assert len(silent) > 20
    assert all(out[2][p] == out[1][p] for p in silent)
    assert sum(out[2][r.path] != out[1][r.path] for r in wv.train) > len(wv.train) // 2


def test_mismatched_inputs_are_clear_errors(run, capsys):
    folder, _, _, _ = run
    (folder / "other.tsv").write_text("google/q9999/zzz.jpg\tn00000001:0.5\n")
    args = ["weights", "--data", str(folder / "data"), "--knn", str(folder / "knn.tsv"), "--stage", "1",
            "--out", str(folder / "x.tsv"), "--no-plot", "--predictions"]
    assert main(args + [str(folder / "other.tsv")]) == 2
    assert "other.tsv:1: 'n00000001' is not one of the 16 classes" in capsys.readouterr().err
    wnid = load_webvision(folder / "data").wnids[0]
    (folder / "other.tsv").write_text(f"google/q9999/zzz.jpg\t{wnid}:0.5\n")
    assert main(args + [str(folder / "other.tsv")]) == 2
    assert "no row names a training image" in capsys.readouterr().err
    assert not (folder / "x.tsv").exists()


def test_auc_leaves_out_images_the_truth_file_lacks(run, capsys):
    """An image missing from truth_train.tsv is unknown, not clean: the printed AUC is over the rest."""
    folder, wv, truth, _ = run
    truth_file = folder / "data" / "truth_train.tsv"
    original = truth_file.read_text()
    noisy = [p for p, t in truth.items() if not t.clean][:30]
    try:
        truth_file.write_text("".join(line + "\n" for line in original.splitlines()
                                      if line.split("\t")[0] not in noisy))
        args = ["weights", "--data", str(folder / "data"), "--knn", str(folder / "knn.tsv"), "--stage", "1",
                "--predictions", str(folder / "pred1.tsv"), "--out", str(folder / "partial.tsv"), "--no-plot"]
        assert main(args) == 0
    finally:
        truth_file.write_text(original)
    weights = read_weights(folder / "partial.tsv")
    kept = [r.path for r in wv.train if r.path not in noisy]
    auc = roc_auc(np.array([weights[p] for p in kept]), np.array([truth[p].clean for p in kept]))
    assert f"AUC clean vs noisy {auc:.4f} (30 images not in truth_train.tsv excluded)" in capsys.readouterr().out


def test_keywords_extracted_in_blocks_by_two_processes_equal_one_list_per_image(run, monkeypatch):
    from megaclass.weighting import pipeline
    from megaclass.weighting.keywords import KeywordExtractor

    _, wv, _, _ = run
    extract = KeywordExtractor()
    expected = []
    for r in wv.train:  # the plain definition: the page's keywords minus its query's, one image at a time
        drop = set(extract(wv.query_text(r) or wv.synsets[r.label][1]))
        expected.append([k for k in extract(r.title, r.description, r.tags) if k not in drop])
    monkeypatch.setattr(pipeline, "KEYWORD_BLOCK", 37)  # 22 blocks over 2 forked workers
    bags = pipeline.train_keyword_bags(wv, KeywordExtractor(), workers=2)
    assert bags.tolist() == expected
    order = list(dict.fromkeys(k for ks in expected for k in ks))  # the vocabulary in order of first sight
    assert bags.words == order
