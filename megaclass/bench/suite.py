"""`megaclass bench weights --suite`: stage 1 and stage 2 beside naive baselines on every noise model.

For each model of `megaclass.data.synth.NOISE_MODELS` a data set is generated (`megaclass synth
--noise MODEL`, default sizes unless told otherwise), the K nearest categories computed (`megaclass
semantics`), and two sets of *simulated* predictions made (`simulated_predictions`: a model that
sees what an image really shows, and memorizes some wrong labels; the second set stands for the
stage-1 model). Then, against the generator's truth, the AUC (clean vs noisy) of:

    stage1, stage2                      this project's weights (stage 2 on the second predictions)
    rank                                1 − (rank − 1) / (largest rank of the source)
    agreement                           p_label + ½ · p(on a KNN neighbour of the label)
    text                                (1 + m) / 2, m the stage-2 text margin (0 for a silent page)
    rank×agreement, rank×text, agreement×text, rank×agreement×text     their products

Targets (issue 13): stage 1 ≥ the best naive baseline *on its own inputs* (rank, agreement,
rank×agreement) + 0.02; stage 2 ≥ stage 1 + 0.03; stage 2 is also shown against every baseline.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from megaclass.io import atomic_output, atomic_write_text

BASELINES = ("rank", "agreement", "text", "rank×agreement", "rank×text", "agreement×text", "rank×agreement×text")
STAGE1_INPUTS = ("rank", "agreement", "rank×agreement")


def simulated_predictions(wv, truth, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-5 predictions from a controlled source instead of a trained model: for each training image,
    the class it really shows is the top-1 with probability 0.7 (an outlier, or the other 0.3: a random
    class), and a noisy image's wrong label is the top-1 with probability 0.3 (a network that memorized
    it); the top-1 gets 0.6, four random classes 0.1 each."""
    rng = np.random.default_rng(seed)
    index = {w: i for i, w in enumerate(wv.wnids)}
    classes = np.zeros((len(wv.train), 5), dtype=np.int64)
    for i, r in enumerate(wv.train):
        t = truth[r.path]
        shown = index.get(t.true_wnid, -1)
        top = shown if shown >= 0 and rng.random() < 0.7 else int(rng.integers(wv.num_classes))
        if not t.clean and rng.random() < 0.3:
            top = r.label
        rest = [c for c in rng.permutation(wv.num_classes) if c != top][:4]
        classes[i] = [top, *rest]
    probs = np.tile([0.6, 0.1, 0.1, 0.1, 0.1], (len(wv.train), 1))
    return classes, probs


def baseline_scores(wv, pred_classes: np.ndarray, pred_probs: np.ndarray, neighbors: np.ndarray,
                    margin: np.ndarray) -> dict[str, np.ndarray]:
    """The naive scores of every training image (module docstring)."""
    labels = np.array([r.label for r in wv.train])
    sources = np.array([r.source for r in wv.train])
    ranks = np.array([np.nan if r.rank is None else r.rank for r in wv.train], dtype=np.float64)
    deepest = {s: np.nanmax(np.where(sources == s, ranks, np.nan)) for s in np.unique(sources)}
    depth = np.array([deepest[s] for s in sources])
    rank = np.where(np.isnan(ranks), 0.5, 1 - (np.nan_to_num(ranks, nan=1.0) - 1) / np.maximum(depth, 1))
    on_label = pred_classes == labels[:, None]
    on_neighbour = (pred_classes[:, :, None] == neighbors[labels][:, None, :]).any(-1) & (pred_classes >= 0)
    agreement = (pred_probs * on_label).sum(1) + 0.5 * (pred_probs * on_neighbour).sum(1)
    text = (1 + np.nan_to_num(margin, nan=0.0)) / 2
    out = {"rank": rank, "agreement": agreement, "text": text}
    for name in BASELINES[3:]:
        out[name] = np.prod([out[part] for part in name.split("×")], axis=0)
    return out


def evaluate_model(root: str | os.PathLike, work: str | os.PathLike, embeddings=None, knn_k: int = 5) -> dict:
    """Weights and baselines on the data set at `root` -> {"auc": {method: AUC}, "scores": {...},
    "clean": bool [N], ...}; knn.tsv, predictions and weights are written under `work`."""
    from megaclass.data import load_webvision
    from megaclass.data.synth import read_truth
    from megaclass.semantics import nearest_categories, read_knn_tsv, write_knn_tsv
    from megaclass.weighting.keywords import KeywordExtractor
    from megaclass.weighting.metrics import roc_auc
    from megaclass.weighting.pipeline import compute_weights
    from megaclass.weighting.stage1 import knn_arrays
    from megaclass.weighting.stage2 import Stage2Config, class_descriptions, image_keywords, text_margin, text_vectors
    from megaclass.weighting.tables import write_predictions, write_weights

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    wv = load_webvision(root)
    truth = read_truth(root)
    paths = [r.path for r in wv.train]
    knn = work / "knn.tsv"
    nb, sc = nearest_categories(wv.wnids, knn_k)
    write_knn_tsv(knn, wv.wnids, nb, sc)
    neighbors, _ = knn_arrays(wv.wnids, read_knn_tsv(knn))
    preds = {}
    for stage, seed in ((1, 0), (2, 1)):
        preds[stage] = simulated_predictions(wv, truth, seed)
        write_predictions(work / f"pred{stage}.tsv", paths, wv.wnids, *preds[stage])
    w1 = compute_weights(root, knn, work / "pred1.tsv", 1, data=wv)
    write_weights(work / "w1.tsv", paths, w1.weights)
    w2 = compute_weights(root, knn, work / "pred2.tsv", 2, data=wv, embeddings=embeddings, stage1_tsv=work / "w1.tsv")
    # the text margin the text baselines use: the same features stage 2 uses, on the same predictions
    extractor = KeywordExtractor()
    image_kw = image_keywords(extractor, [r.title for r in wv.train], [r.description for r in wv.train],
                              [r.tags for r in wv.train], [wv.query_text(r) or wv.synsets[r.label][1] for r in wv.train])
    class_kw = [extractor(t) for t in class_descriptions(wv.synsets)]
    cfg = Stage2Config()
    image_vectors, class_vectors = text_vectors(image_kw, class_kw, embeddings, cfg.min_df, cfg.max_vocabulary)
    labels = np.array([r.label for r in wv.train])
    margin = text_margin(image_vectors, labels, preds[2][0], class_vectors)
    clean = np.array([truth[p].clean for p in paths])
    scores = {"stage1": w1.weights, "stage2": w2.weights, **baseline_scores(wv, *preds[1], neighbors, margin)}
    auc = {name: roc_auc(s, clean) for name, s in scores.items()}
    best1 = max(STAGE1_INPUTS, key=auc.get)
    best = max(BASELINES, key=auc.get)
    return {"auc": auc, "scores": scores, "clean": clean, "images": len(paths), "wrong_label_rate": float(1 - clean.mean()),
            "best_stage1_input_baseline": best1, "best_baseline": best,
            "stage1_minus_best_own_input_baseline": auc["stage1"] - auc[best1],
            "stage2_minus_stage1": auc["stage2"] - auc["stage1"], "stage2_minus_best_baseline": auc["stage2"] - auc[best],
            "pages_with_text_evidence": w2.notes.get("pages_with_text_evidence"), "stage1_clean_rate": w1.notes.get("clean_rate")}


def plot_suite(path: str | os.PathLike, table: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(table)
    methods = ["stage1", "stage2", *BASELINES]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(models)), 4.5))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        ax.bar(np.arange(len(models)) + (j - len(methods) / 2 + 0.5) * width, [table[m]["auc"][method] for m in models],
               width, label=method, color=("C3" if method == "stage1" else "C2" if method == "stage2" else None),
               alpha=1.0 if method.startswith("stage") else 0.6)
    ax.set_xticks(np.arange(len(models)), models)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("AUC clean vs noisy")
    ax.set_title("weights vs naive baselines per noise model (simulated predictions)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncol=3, fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def markdown(table: dict) -> str:
    methods = ["stage1", "stage2", *BASELINES]
    lines = ["| noise model | " + " | ".join(methods) + " | s1 − best own-input | s2 − s1 |",
             "| --- |" + " ---: |" * (len(methods) + 2)]
    for model, row in table.items():
        lines.append(f"| {model} | " + " | ".join(f"{row['auc'][m]:.3f}" for m in methods)
                     + f" | {row['stage1_minus_best_own_input_baseline']:+.3f} | {row['stage2_minus_stage1']:+.3f} |")
    return "\n".join(lines)


def run_suite(out_dir: str | os.PathLike, synth_cfg=None, models=None, progress: bool = True) -> dict:
    """Every noise model: generate, weigh, score -> OUT_DIR/suite.json, suite.md, suite.png."""
    from megaclass.data.synth import NOISE_MODELS, SynthConfig, generate
    from megaclass.weighting.text import KeywordEmbeddings

    out_dir = Path(out_dir)
    base = synth_cfg or SynthConfig()
    embeddings = KeywordEmbeddings()  # one encoder and keyword cache for every model
    table = {}
    for model in models or list(NOISE_MODELS):
        root = out_dir / model / "data"
        if not (root / "info" / "synsets.txt").is_file():
            generate(root, replace(base, noise=model), progress=progress)
        result = evaluate_model(root, out_dir / model, embeddings)
        table[model] = {k: v for k, v in result.items() if k not in ("scores", "clean")}
        if progress:
            print(f"{model}: " + " ".join(f"{k}={v:.3f}" for k, v in result["auc"].items()), flush=True)
    atomic_write_text(out_dir / "suite.json", json.dumps(table, indent=1) + "\n")
    atomic_write_text(out_dir / "suite.md", markdown(table) + "\n")
    plot_suite(out_dir / "suite.png", table)
    return table
