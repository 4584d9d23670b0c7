"""The seed's experiment in one command: baseline -> +Stage1 -> +Stage1+Stage2.

    semantics (K nearest categories) -> train baseline -> predict on the training images
    -> stage-1 weights -> train -> predict -> stage-2 weights -> train
    -> class-balanced top-1/top-5 of each model on the clean validation set

Every rank runs this module (under `deepspeed`, `torchrun` or `mpirun`); rank 0 alone runs the
single-process steps (semantics, weights) through the library APIs while the others wait, and all
ranks then learn whether it worked, so that a failure stops every rank with the same error.
Outputs in `run_dir`: `results.json` ({"baseline": {"top1", "top5"}, "stage1": ..., "stage2": ...}, percent),
`weights_stage1.tsv`, `weights_stage2.tsv`, `curves.png`, and one folder per run (checkpoints,
metrics CSV, TensorBoard, predictions).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

from megaclass.engine.config import Config
from megaclass.engine.data import RunData, read_weight_table
from megaclass.engine.pipeline import trainer_class
from megaclass.engine.trainer import TrainData, device_of_rank
from megaclass.io import atomic_output, atomic_write_text
from megaclass.parallel import comm
from megaclass.weighting.tables import write_predictions

log = logging.getLogger(__name__)

RUNS = (("baseline", "Baseline"), ("stage1", "+Stage1"), ("stage2", "+Stage1+Stage2"))


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


def _semantics(cfg: Config, data: RunData, knn: str) -> None:
    """`RUN_DIR/semantics/knn.tsv`: the K nearest categories of every class (cached beside it)."""
    from megaclass.semantics import nearest_categories, write_knn_tsv

    wnids = data.webvision.wnids
    neighbors, scores = nearest_categories(wnids, cfg.experiment.knn_k, encoder=cfg.experiment.encoder,
                                           cache_dir=os.path.join(os.path.dirname(knn), "cache"),
                                           names=[text for _, text in data.webvision.synsets],
                                           progress=cfg.train.progress)
    write_knn_tsv(knn, wnids, neighbors, scores)


def _weights(cfg: Config, data: RunData, knn: str, predictions: str, stage: int, out: str,
             stage1_tsv: str | None = None) -> None:
    """Stage-`stage` weights of every training image -> `out` (TSV) and a PNG of examples beside it;
    stage 2 adds its text evidence to the stage-1 weights in `stage1_tsv`."""
    from megaclass.weighting.pipeline import compute_weights, save_weights

    result = compute_weights(cfg.data.root, knn, predictions, stage, data=data.webvision, progress=cfg.train.progress,
                             stage1_tsv=stage1_tsv)
    log.info("%s", save_weights(result, cfg.data.root, out))


def table(results: dict) -> str:
    lines = ["| Method | Top-1 (%) | Top-5 (%) |", "| --- | ---: | ---: |"]
    lines += [f"| {label} | {results[key]['top1']:.2f} | {results[key]['top5']:.2f} |" for key, label in RUNS if key in results]
    return "\n".join(lines)


def plot_curves(path: str, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in RUNS:
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


def run(cfg: Config, data: RunData) -> dict:
    """Collective: every rank calls it. Returns the results dict (on every rank)."""
    rank0 = comm.rank() == 0
    run_dir = cfg.run_dir
    os.makedirs(run_dir, exist_ok=True)
    paths = data.paths
    if rank0:
        log.info("%s", data.webvision.summary())

    device = device_of_rank()
    knn = os.path.join(run_dir, "semantics", "knn.tsv")
    on_rank0("semantics (K nearest categories)", lambda: _semantics(cfg, data, knn), device)

    results, curves, weights = {}, {}, None
    for index, (key, label) in enumerate(RUNS):
        stage_cfg = dataclasses.replace(cfg, run_dir=os.path.join(run_dir, key))
        trainer = trainer_class(cfg)(stage_cfg, TrainData(data.train, data.webvision.num_classes, data.labels, weights), name=key)
        # The validation set is only ever scored: without it every weight and model come out the same.
        has_val = len(data.val_labels) > 0
        rows = trainer.fit(val=(data.val, data.val_labels) if has_val else None)
        curves[key] = {"train": rows, "val": trainer.eval_rows}
        if has_val:
            results[key] = trainer.evaluate(data.val, data.val_labels)
            if rank0:
                log.info("%s: top-1 %.2f%%  top-5 %.2f%%", label, results[key]["top1"], results[key]["top5"])
        if index < 2:
            probs, classes = trainer.predict(data.train_eval, cfg.eval.topk, desc=f"predict {key}")
            stage = index + 1
            weights_path = os.path.join(run_dir, f"weights_stage{stage}.tsv")
            predictions = os.path.join(stage_cfg.run_dir, "predictions_train.tsv")

            def weigh():
                write_predictions(predictions, paths, data.webvision.wnids, classes.numpy(), probs.numpy())
                _weights(cfg, data, knn, predictions, stage, weights_path,
                         os.path.join(run_dir, "weights_stage1.tsv") if stage == 2 else None)

            on_rank0(f"stage-{stage} weights", weigh, device)
            weights = read_weight_table(weights_path, paths, allow_extra=bool(cfg.data.limit_train))
        trainer.close()

    def report():
        atomic_write_text(os.path.join(run_dir, "results.json"), json.dumps(results, indent=2))
        atomic_write_text(os.path.join(run_dir, "curves.json"), json.dumps(curves, indent=2))
        plot_curves(os.path.join(run_dir, "curves.png"), curves)
        print(table(results), flush=True)

    on_rank0("writing the results", report, device)
    return results
