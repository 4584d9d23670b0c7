"""The seed's experiment in one command: baseline -> +Stage1 -> +Stage1+Stage2 (-> the oracle).

    semantics (K nearest categories) -> train baseline -> predict on the training images
    -> stage-1 weights -> train -> predict -> stage-2 weights -> train
    -> class-balanced top-1/top-5 of each model on the clean validation set

The predictions on the training images come from each stage's own model (`experiment.predictions:
final`) or are cross-fitted (`crossfit`): for each of `experiment.folds` folds a model trained like
the stage's own on the other folds predicts the fold, so that no image is judged by a model that saw
its label; the reported models are always the ones trained on every image. `experiment.oracle` adds
a fourth run, the clean-only oracle (weights 1 for clean, 0 for noisy images, from the synthetic
data's truth_train.tsv).

Every rank runs this module (under `deepspeed`, `torchrun` or `mpirun`); rank 0 alone runs the
single-process steps (semantics, weights) through the library APIs while the others wait, and all
ranks then learn whether it worked, so that a failure stops every rank with the same error.
Outputs in `run_dir`: `results.json` ({"baseline": {"top1", "top5", "seconds", "predict_seconds"},
"stage1": ..., "stage2": ..., ["oracle": ...], "predictions", "folds", ["weights_auc"]}, percent and
seconds), `weights_stage1.tsv`, `weights_stage2.tsv`, `curves.png`, and one folder per run
(checkpoints, metrics CSV, TensorBoard, predictions; the fold models' under `<run>/fold<f>/`).
The validation set is only scored: the weights do not depend on it (tests/test_engine_experiment.py).

On shards (`data.shards`) the side information comes from each sample's KEY.json
(`megaclass.data.metadata`), as `megaclass weights` reads it; `truth_train.tsv` (the AUC, the oracle)
and the plots' thumbnails come from `data.root` when it is set beside `data.shards` (the shards folder
has neither: the plots then show no thumbnails).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence

import torch

from megaclass.data import WebVision
from megaclass.engine.config import Config, ConfigError
from megaclass.engine.data import RunData, Subset, read_weight_table
from megaclass.engine.pipeline import trainer_class
from megaclass.engine.trainer import TrainData, device_of_rank
from megaclass.io import atomic_output, atomic_write_text
from megaclass.parallel import comm
from megaclass.seeding import derive_seed
from megaclass.weighting.tables import write_predictions

log = logging.getLogger(__name__)

RUNS = (("baseline", "Baseline"), ("stage1", "+Stage1"), ("stage2", "+Stage1+Stage2"))
ORACLE = ("oracle", "Clean-only oracle")


class StepFailed(RuntimeError):
    """A single-process step (semantics, weights) failed on rank 0; raised on every rank alike."""


def on_rank0(what: str, fn, device) -> None:
    """Run `fn()` on rank 0 alone, then share whether it worked, so that a failure raises the same
    `StepFailed` on every rank instead of leaving the others waiting at the next collective."""
    error = None
    if comm.rank() == 0:
        try:
            fn()
        except Exception as exc:  # any failure: the other ranks must hear of it, whatever it is
            error = exc
    failed = comm.gather_ints([error is not None], device=device)[0][0]
    if failed:
        reason = f"{type(error).__name__}: {error}" if error is not None else "see rank 0's error"
        raise StepFailed(f"{what} failed on rank 0 ({reason})") from error


def side_information(cfg: Config, data: RunData) -> WebVision:
    """The training images' side information: data.root's (read with the data), or on shards their KEY.json."""
    from megaclass.data.metadata import load_metadata

    return data.webvision if data.webvision is not None else load_metadata(cfg.data.shards)


def _semantics(cfg: Config, info: WebVision, knn: str) -> None:
    """`RUN_DIR/semantics/knn.tsv`: the K nearest categories of every class (cached beside it)."""
    from megaclass.semantics import nearest_categories, write_knn_tsv

    wnids = info.wnids
    neighbors, scores = nearest_categories(wnids, cfg.experiment.knn_k, encoder=cfg.experiment.encoder,
                                           cache_dir=os.path.join(os.path.dirname(knn), "cache"),
                                           names=[text for _, text in info.synsets],
                                           progress=cfg.train.progress)
    write_knn_tsv(knn, wnids, neighbors, scores)


def _weights(cfg: Config, info: WebVision, knn: str, predictions: str, stage: int, out: str,
             stage1_tsv: str | None = None) -> float | None:
    """Stage-`stage` weights of every training image -> `out` (TSV) and a PNG of examples beside it;
    stage 2 adds its text evidence to the stage-1 weights in `stage1_tsv`. Returns their AUC for clean
    vs noisy images where `data.root/truth_train.tsv` tells (synthetic data), else None."""
    from megaclass.weighting.pipeline import compute_weights, save_weights

    root = cfg.data.root or cfg.data.shards  # truth and thumbnails live in data.root, when there is one
    result = compute_weights(root, knn, predictions, stage, data=info, progress=cfg.train.progress,
                             stage1_tsv=stage1_tsv)
    log.info("%s", save_weights(result, root, out))
    return result.auc


def crossfit_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """[N] fold (0 .. folds-1) of every training image, from the seed alone: the images in a seeded
    random order, grouped by label (stably), dealt to the folds in turn. Every fold thus holds each
    class's images to within one, and the folds' sizes differ by at most one."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(derive_seed(seed, "crossfit folds")))
    order = order[torch.argsort(labels[order], stable=True)]
    fold = torch.empty(len(labels), dtype=torch.long)
    fold[order] = torch.arange(len(labels)) % folds
    return fold


def _fit(cfg: Config, data: TrainData, run_dir: str, name: str, val=None):
    """Train one model of the experiment (config `cfg`, folder `run_dir`); returns the trainer (to
    evaluate, predict, close), its logged rows and the seconds it took."""
    t0 = time.perf_counter()
    trainer = trainer_class(cfg)(dataclasses.replace(cfg, run_dir=run_dir), data, name=name)
    rows = trainer.fit(val=val)
    return trainer, rows, time.perf_counter() - t0


def crossfit_predictions(cfg: Config, data: RunData, weights: torch.Tensor | None, key: str):
    """Top-k (probs [N, k], classes [N, k]) of every training image, each from a model that never saw
    it: for each fold of `crossfit_folds`, a model trained as run `key` (the same config and weights)
    on the other folds predicts the fold. Collective. Folders: `run_dir/<key>/fold<f>/`."""
    k, n = cfg.eval.topk, len(data.labels)
    fold = crossfit_folds(data.labels, cfg.experiment.folds, cfg.train.seed)
    probs, classes = torch.zeros(n, k), torch.full((n, k), -1, dtype=torch.long)
    for f in range(cfg.experiment.folds):
        train, held = (fold != f).nonzero().squeeze(1), (fold == f).nonzero().squeeze(1)
        subset = TrainData(Subset(data.train, train), data.num_classes, data.labels[train],
                           None if weights is None else weights[train], data.wnids)
        trainer, _, _ = _fit(cfg, subset, os.path.join(cfg.run_dir, key, f"fold{f}"), f"{key}_fold{f}")
        probs[held], classes[held] = trainer.predict(Subset(data.train_eval, held), k, desc=f"predict {key} fold {f}")
        trainer.close()
    return probs, classes


def oracle_weights(cfg: Config, paths: Sequence[str]) -> torch.Tensor:
    """The clean-only oracle's weights: 1 for every clean, 0 for every noisy training image, from
    `data.root/truth_train.tsv` (written by `megaclass synth`)."""
    from megaclass.data.synth import TRUTH_FILE, read_truth

    if not cfg.data.root:
        raise ConfigError(f"experiment.oracle: needs data.root/{TRUTH_FILE} (which images are clean); on shards, "
                          f"set data.root to the folder they were converted from, or experiment.oracle=false")
    truth = read_truth(cfg.data.root)
    where = os.path.join(cfg.data.root, TRUTH_FILE)
    if truth is None:
        raise ConfigError(f"experiment.oracle: needs {where} (which images are clean; `megaclass synth` writes it), "
                          f"and there is none; set experiment.oracle=false")
    missing = [p for p in paths if p not in truth]
    if missing:
        raise ValueError(f"{where}: no row for {len(missing)} training images, e.g. {missing[0]!r}")
    return torch.tensor([float(truth[p].clean) for p in paths])


def table(results: dict) -> str:
    """The results as a markdown table; with the oracle, the share of its gap over the baseline that
    each stage closes: (run − baseline) / (oracle − baseline) in top-1."""
    oracle = "oracle" in results and "top1" in results["oracle"]
    lines = ["| Method | Top-1 (%) | Top-5 (%) |" + (" oracle gap closed |" if oracle else ""),
             "| --- | ---: | ---: |" + (" ---: |" if oracle else "")]
    for key, label in RUNS + (ORACLE,):
        if "top1" not in results.get(key, {}):
            continue
        line = f"| {label} | {results[key]['top1']:.2f} | {results[key]['top5']:.2f} |"
        if oracle:
            line += f" {gap_closed(results, key):.0%} |" if key in ("stage1", "stage2") else " |"
        lines.append(line)
    return "\n".join(lines)


def gap_closed(results: dict, key: str) -> float:
    """(run − baseline) / (oracle − baseline), top-1: the share of the clean-only oracle's gain over
    the baseline that run `key` attains."""
    base = results["baseline"]["top1"]
    return (results[key]["top1"] - base) / (results["oracle"]["top1"] - base)


def plot_curves(path: str, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in RUNS + (ORACLE,):
        if key not in curves:
            continue
        steps = curves[key]["train"]
        ax_loss.plot([r["epoch"] for r in steps], [r["loss"] for r in steps], label=label, alpha=0.8)
        evals = curves[key]["val"]
        ax_acc.plot([r["epoch"] for r in evals], [r["top1"] for r in evals], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="weighted training loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="class-balanced top-1 (%)", title="clean validation top-1")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def run(cfg: Config, data: RunData, oracle: torch.Tensor | None = None) -> dict:
    """Collective: every rank calls it. Returns the results dict (on every rank). `oracle`: the
    clean-only oracle's weights when the caller has read them already (default: `oracle_weights`,
    when `experiment.oracle` is set)."""
    rank0 = comm.rank() == 0
    run_dir = cfg.run_dir
    os.makedirs(run_dir, exist_ok=True)
    paths = data.paths
    if cfg.experiment.oracle and oracle is None:
        oracle = oracle_weights(cfg, paths)  # a missing truth file: before any work
    info = side_information(cfg, data)
    if rank0:
        log.info("%s", info.summary())

    device = device_of_rank()
    knn = os.path.join(run_dir, "semantics", "knn.tsv")
    on_rank0("semantics (K nearest categories)", lambda: _semantics(cfg, info, knn), device)

    # The validation set is only ever scored: without it every weight and model come out the same.
    val = (data.val, data.val_labels) if len(data.val_labels) > 0 else None
    results, curves, aucs, weights = {}, {}, {}, None
    runs = RUNS + ((ORACLE,) if oracle is not None else ())
    for index, (key, label) in enumerate(runs):
        if key == "oracle":
            weights = oracle
        trainer, rows, seconds = _fit(cfg, TrainData(data.train, data.num_classes, data.labels, weights, data.wnids),
                                      os.path.join(run_dir, key), key, val)
        curves[key] = {"train": rows, "val": trainer.eval_rows}
        results[key] = {"seconds": round(seconds, 1)}
        if val is not None:
            results[key].update(trainer.evaluate(*val))
            if rank0:
                log.info("%s: top-1 %.2f%%  top-5 %.2f%%", label, results[key]["top1"], results[key]["top5"])
        stage = index + 1
        if stage > 2:
            trainer.close()
            continue
        t0 = time.perf_counter()
        if cfg.experiment.predictions == "final":
            probs, classes = trainer.predict(data.train_eval, cfg.eval.topk, desc=f"predict {key}")
            trainer.close()
        else:
            trainer.close()
            probs, classes = crossfit_predictions(cfg, data, weights, key)
        results[key]["predict_seconds"] = round(time.perf_counter() - t0, 1)
        if rank0:
            log.info("%s: predictions on the training images (%s) took %.0f s", label, cfg.experiment.predictions,
                     results[key]["predict_seconds"])
        weights_path = os.path.join(run_dir, f"weights_stage{stage}.tsv")
        predictions = os.path.join(run_dir, key, "predictions_train.tsv")

        def weigh():
            write_predictions(predictions, paths, data.wnids, classes.numpy(), probs.numpy())
            aucs[f"stage{stage}"] = _weights(cfg, info, knn, predictions, stage, weights_path,
                                             os.path.join(run_dir, "weights_stage1.tsv") if stage == 2 else None)

        on_rank0(f"stage-{stage} weights", weigh, device)
        weights = read_weight_table(weights_path, paths, allow_extra=bool(cfg.data.limit_train))

    def report():
        written = {**results, "predictions": cfg.experiment.predictions, "folds": cfg.experiment.folds}
        if any(auc is not None for auc in aucs.values()):
            written["weights_auc"] = aucs
        atomic_write_text(os.path.join(run_dir, "results.json"), json.dumps(written, indent=2))
        atomic_write_text(os.path.join(run_dir, "curves.json"), json.dumps(curves, indent=2))
        plot_curves(os.path.join(run_dir, "curves.png"), curves)
        print(table(results), flush=True)

    on_rank0("writing the results", report, device)
    return results
