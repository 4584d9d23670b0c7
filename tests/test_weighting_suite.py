"""The noise-model suite (`megaclass synth --noise`, `megaclass bench weights --suite`), small.

Structural facts of each noise model from the generator's own truth file, the suite's table and
picture, and its AUCs recomputed here from the raw data by counting pairs (no shared code)."""
import json

import numpy as np
import pytest

from megaclass.data import load_webvision
from megaclass.data.synth import NOISE_MODELS, SynthConfig, read_truth

MODELS = list(NOISE_MODELS)


pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # 7 data sets generated and weighed: ~35 s of CPU


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    from megaclass.bench.suite import run_suite

    out = tmp_path_factory.mktemp("suite")
    table = run_suite(out, SynthConfig(classes=10, per_class=24, val_per_class=1, image_size=8, seed=3), progress=False)
    return out, table


def pair_auc(scores, positive):
    pos, neg = scores[positive], scores[~positive]
    return ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))


def test_each_noise_model_makes_the_noise_it_names(suite):
    out, _ = suite
    kinds = {}
    for model in MODELS:
        truth = read_truth(out / model / "data")
        kinds[model] = {t.kind for t in truth.values() if not t.clean}
    assert kinds["uniform"] == {"unrelated"}
    assert kinds["outlier-query"] == {"outlier"}
    assert "confusable" in kinds["wordnet"] and "outlier" not in kinds["wordnet"]
    assert kinds["web"] == {"confusable", "unrelated", "outlier"}
    wv = load_webvision(out / "outlier-query" / "data")
    truth = read_truth(out / "outlier-query" / "data")
    outliers = [r for r in wv.train if truth[r.path].kind == "outlier" and r.title]
    assert outliers and all(wv.query_text(r).lower() in (r.title or "").lower() for r in outliers)
    silent = {m: np.mean([not (r.title or r.description or r.tags) for r in load_webvision(out / m / "data").train])
              for m in ("web", "no-text")}
    assert silent["web"] < 0.05 and 0.45 < silent["no-text"] < 0.75


def wrong_rate_by_rank(root):
    wv, truth = load_webvision(root), read_truth(root)
    ranks = np.array([r.rank or 0 for r in wv.train])
    wrong = np.array([not truth[r.path].clean for r in wv.train])
    known = ranks > 0
    top, deep = known & (ranks <= np.median(ranks[known])), known & (ranks > np.median(ranks[known]))
    return wrong[top].mean(), wrong[deep].mean()


def test_flat_rank_noise_does_not_rise_with_rank(suite):
    out, _ = suite
    top, deep = wrong_rate_by_rank(out / "web" / "data")
    assert deep > top + 0.15
    top, deep = wrong_rate_by_rank(out / "flat-rank" / "data")
    assert abs(deep - top) < 0.12


def test_suite_table_picture_and_aucs(suite):
    out, table = suite
    assert list(json.loads((out / "suite.json").read_text())) == MODELS
    assert (out / "suite.png").stat().st_size > 10_000
    assert len((out / "suite.md").read_text().splitlines()) == 2 + len(MODELS)
    for model in MODELS:
        auc = table[model]["auc"]
        assert set(auc) == {"stage1", "stage2", "rank", "agreement", "text", "rank×agreement", "rank×text",
                            "agreement×text", "rank×agreement×text"}
        assert all(0 <= v <= 1 for v in auc.values())
        # the rank baseline, from the raw data: higher for an earlier rank within the source
        wv, truth = load_webvision(out / model / "data"), read_truth(out / model / "data")
        clean = np.array([truth[r.path].clean for r in wv.train])
        deepest = {s: max(r.rank for r in wv.train if r.source == s and r.rank) for s in ("google", "flickr")}
        rank = np.array([0.5 if r.rank is None else 1 - (r.rank - 1) / deepest[r.source] for r in wv.train])
        assert abs(pair_auc(rank, clean) - auc["rank"]) < 1e-12
        weights = {}
        for stage in (1, 2):
            rows = (out / model / f"w{stage}.tsv").read_text().splitlines() if stage == 1 else None
            if rows:
                weights = dict((p, float(w)) for p, w in (line.split("\t") for line in rows))
        w1 = np.array([weights[r.path] for r in wv.train])
        assert abs(pair_auc(w1, clean) - auc["stage1"]) < 1e-12
        best = max(("rank", "agreement", "rank×agreement"), key=auc.get)
        assert table[model]["best_stage1_input_baseline"] == best
        assert abs(table[model]["stage2_minus_stage1"] - (auc["stage2"] - auc["stage1"])) < 1e-12
