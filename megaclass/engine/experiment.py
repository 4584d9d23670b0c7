"""The seed's experiment in one command: baseline -> +Stage1 -> +Stage1+Stage2 (-> the oracle), or
(`experiment.mode: online | online_loss`) one training that weighs its images as it goes.

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
Outputs in `run_dir`: `results.json` ({"baseline": {"top1", "top5", "seconds", "predict_seconds",
"image_steps", "total_seconds"}, "stage1": {..., "weights_auc"}, "stage2": ..., ["oracle": ...],
"predictions", "folds", "config"}, percent and seconds; `image_steps` and `total_seconds` are what the
row's model cost in all, the trainings and predictions its weights needed included; `weights_auc` the
AUC of the weights it trained with, clean vs noisy, where data.root has the truth),
`weights_stage1.tsv`, `weights_stage2.tsv`, `curves.png`, and one folder per run (checkpoints, metrics
CSV, TensorBoard, predictions; the fold models' under `<run>/fold<f>/`).

`experiment.mode: online` (or `online_loss`) trains once (`megaclass.engine.online`, docs/weighting.md
"Online") into `run_dir/online/` and adds the row "online" (or "online_loss") to `results.json`, with
the per-epoch re-estimates under "estimates" and the final weights in `weights_online.tsv`. Rows of the
other modes already in `results.json` are kept when their config was the same but for the mode (its
hash, "config"), so `make demo`'s two commands print one table.
The validation set is only scored: the weights do not depend on it (tests/test_engine_experiment.py,
tests/test_engine_online.py).

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
ONLINE = (("online", "Online (one training)"), ("online_loss", "Online, loss only"))
ROWS = RUNS + ONLINE + (ORACLE,)
STAGED_KEYS = tuple(key for key, _ in RUNS) + ("oracle",)


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

    return data.webvision if data.webvision is not None else load_metadata(cfg.data.shards, cache=cfg.data.shard_cache)


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
                             stage1_tsv=stage1_tsv, workers=1)  # no fork inside a distributed rank
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
    on the other folds predicts the fold; and the fold models' training image-steps. Collective.
    Folders: `run_dir/<key>/fold<f>/`."""
    k, n = cfg.eval.topk, len(data.labels)
    fold = crossfit_folds(data.labels, cfg.experiment.folds, cfg.train.seed)
    probs, classes = torch.zeros(n, k), torch.full((n, k), -1, dtype=torch.long)
    steps = 0
    for f in range(cfg.experiment.folds):
        train, held = (fold != f).nonzero().squeeze(1), (fold == f).nonzero().squeeze(1)
        subset = TrainData(Subset(data.train, train), data.num_classes, data.labels[train],
                           None if weights is None else weights[train], data.wnids)
        trainer, _, _ = _fit(cfg, subset, os.path.join(cfg.run_dir, key, f"fold{f}"), f"{key}_fold{f}")
        probs[held], classes[held] = trainer.predict(Subset(data.train_eval, held), k, desc=f"predict {key} fold {f}")
        steps += _image_steps(cfg, trainer)
        trainer.close()
    return probs, classes, steps


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
    """The results as a markdown table: top-1/top-5, the weights' AUC for clean vs noisy images where a
    truth exists, and what each row's model cost in all (its own training plus the trainings and
    predictions its weights needed), in image-steps (images through a forward pass: training steps ×
    global batch, plus predictions) and wall seconds. With the oracle, the share of its gap over the
    baseline that each weighted row closes: (run − baseline) / (oracle − baseline) in top-1."""
    oracle = "oracle" in results and "top1" in results["oracle"] and "top1" in results.get("baseline", {})
    auc = any("weights_auc" in results.get(key, {}) for key, _ in ROWS)
    head = "| Method | Top-1 (%) | Top-5 (%) |" + (" weights AUC |" if auc else "") + " image-steps | wall (s) |"
    rule = "| --- | ---: | ---: |" + (" ---: |" if auc else "") + " ---: | ---: |"
    lines = [head + (" oracle gap closed |" if oracle else ""), rule + (" ---: |" if oracle else "")]
    for key, label in ROWS:
        row = results.get(key, {})
        if "top1" not in row:
            continue
        line = f"| {label} | {row['top1']:.2f} | {row['top5']:.2f} |"
        if auc:
            line += f" {row['weights_auc']:.3f} |" if row.get("weights_auc") is not None else " |"
        line += f" {row['image_steps']:,} |" if "image_steps" in row else " |"
        line += f" {row['total_seconds']:.0f} |" if "total_seconds" in row else " |"
        if oracle:
            line += f" {gap_closed(results, key):.0%} |" if key not in ("baseline", "oracle") else " |"
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
    for key, label in ROWS:
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


def _image_steps(cfg: Config, trainer) -> int:
    """Images through a training forward pass in `trainer`'s run: steps × global batch."""
    return trainer.step * trainer.data_world * cfg.train.micro_batch_size * cfg.train.grad_accum


def run(cfg: Config, data: RunData, oracle: torch.Tensor | None = None) -> dict:
    """Collective: every rank calls it. Returns the results dict (on every rank). `oracle`: the
    clean-only oracle's weights when the caller has read them already (default: `oracle_weights`,
    when `experiment.oracle` is set)."""
    rank0 = comm.rank() == 0
    run_dir = cfg.run_dir
    os.makedirs(run_dir, exist_ok=True)
    if cfg.experiment.oracle and oracle is None:
        oracle = oracle_weights(cfg, data.paths)  # a missing truth file: before any work
    info = side_information(cfg, data)
    if rank0:
        log.info("%s", info.summary())

    device = device_of_rank()
    knn = os.path.join(run_dir, "semantics", "knn.tsv")
    on_rank0("semantics (K nearest categories)", lambda: _semantics(cfg, info, knn), device)

    # The validation set is only ever scored: without it every weight and model come out the same.
    val = (data.val, data.val_labels) if len(data.val_labels) > 0 else None
    if cfg.experiment.mode == "staged":
        results, curves = _staged(cfg, data, info, knn, val, oracle, device)
    else:
        results, curves = _online(cfg, data, info, knn, val, device)

    def report():
        written = {**_rows_kept(run_dir, cfg), **results, "predictions": cfg.experiment.predictions,
                   "folds": cfg.experiment.folds, "config": _fingerprint(cfg)}
        atomic_write_text(os.path.join(run_dir, "results.json"), json.dumps(written, indent=2))
        every_curve = {**_curves_kept(run_dir, written), **curves}
        atomic_write_text(os.path.join(run_dir, "curves.json"), json.dumps(every_curve, indent=2))
        plot_curves(os.path.join(run_dir, "curves.png"), every_curve)
        print(table(written), flush=True)

    on_rank0("writing the results", report, device)
    return results


def _fingerprint(cfg: Config) -> str:
    """What makes two modes' rows comparable: the whole config but the mode, the oracle switch and the
    online modes' own settings."""
    import hashlib

    plain = dataclasses.asdict(cfg)
    for key in ("mode", "oracle", "warmup_epochs", "online_epochs", "online_text", "online_em"):
        plain["experiment"].pop(key)
    plain["data"].pop("shard_cache")  # where a node keeps its copy of the shards
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _rows_kept(run_dir: str, cfg: Config) -> dict:
    """The rows of the other modes already in `run_dir/results.json`, when they were made with the same
    config but the mode (e.g. `make demo`'s staged run, then its online run): one table of both."""
    path = os.path.join(run_dir, "results.json")
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or old.get("config") != _fingerprint(cfg):
        return {}
    mine = STAGED_KEYS if cfg.experiment.mode == "staged" else (cfg.experiment.mode,)
    return {key: old[key] for key, _ in ROWS if key in old and key not in mine}


def _curves_kept(run_dir: str, written: dict) -> dict:
    try:
        with open(os.path.join(run_dir, "curves.json"), encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return {}
    return {key: value for key, value in old.items() if key in written}


def _staged(cfg: Config, data: RunData, info: WebVision, knn: str, val, oracle, device) -> tuple[dict, dict]:
    """The seed's three trainings (and the oracle): baseline, +Stage1, +Stage1+Stage2."""
    rank0 = comm.rank() == 0
    run_dir, paths = cfg.run_dir, data.paths
    results, curves, aucs, weights = {}, {}, {}, None
    spent_steps, spent_seconds = 0, 0.0  # what the weights of the next run cost: the runs and predictions so far
    runs = RUNS + ((ORACLE,) if oracle is not None else ())
    for index, (key, label) in enumerate(runs):
        if key == "oracle":
            weights, spent_steps, spent_seconds = oracle, 0, 0.0
        trainer, rows, seconds = _fit(cfg, TrainData(data.train, data.num_classes, data.labels, weights, data.wnids),
                                      os.path.join(run_dir, key), key, val)
        curves[key] = {"train": rows, "val": trainer.eval_rows}
        spent_steps += _image_steps(cfg, trainer)
        spent_seconds += seconds
        results[key] = {"seconds": round(seconds, 1), "image_steps": spent_steps,
                        "total_seconds": round(spent_seconds, 1)}
        if key in aucs:
            results[key]["weights_auc"] = aucs[key]
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
            spent_steps += len(paths)
        else:
            trainer.close()
            probs, classes, fold_steps = crossfit_predictions(cfg, data, weights, key)
            spent_steps += fold_steps + len(paths)
        results[key]["predict_seconds"] = round(time.perf_counter() - t0, 1)
        spent_seconds += results[key]["predict_seconds"]
        if rank0:
            log.info("%s: predictions on the training images (%s) took %.0f s", label, cfg.experiment.predictions,
                     results[key]["predict_seconds"])
        weights_path = os.path.join(run_dir, f"weights_stage{stage}.tsv")
        predictions = os.path.join(run_dir, key, "predictions_train.tsv")
        next_key = RUNS[stage][0]

        def weigh():
            write_predictions(predictions, paths, data.wnids, classes.numpy(), probs.numpy())
            auc = _weights(cfg, info, knn, predictions, stage, weights_path,
                           os.path.join(run_dir, "weights_stage1.tsv") if stage == 2 else None)
            if auc is not None:
                aucs[next_key] = auc

        t0 = time.perf_counter()
        on_rank0(f"stage-{stage} weights", weigh, device)
        spent_seconds += time.perf_counter() - t0
        aucs.update(comm.gather_objects(aucs)[0])  # rank 0 computed them
        weights = read_weight_table(weights_path, paths, allow_extra=bool(cfg.data.limit_train))
    return results, curves


def _online(cfg: Config, data: RunData, info: WebVision, knn: str, val, device) -> tuple[dict, dict]:
    """One training whose weights are re-estimated at each epoch end (megaclass.engine.online);
    `online_loss` from the per-image loss alone. The final weights go to `weights_<mode>.tsv`."""
    from megaclass.engine.online import OnlineTrainer
    from megaclass.semantics import read_knn_tsv
    from megaclass.weighting.stage1 import knn_arrays

    mode, rank0 = cfg.experiment.mode, comm.rank() == 0
    neighbors = knn_arrays(data.wnids, read_knn_tsv(knn))[0]
    estimate = OnlineEstimate(cfg, data, info, neighbors)
    t0 = time.perf_counter()
    epochs = cfg.experiment.online_epochs or cfg.train.epochs
    trainer = OnlineTrainer(dataclasses.replace(cfg, run_dir=os.path.join(cfg.run_dir, mode),
                                                train=dataclasses.replace(cfg.train, epochs=epochs)),
                            TrainData(data.train, data.num_classes, data.labels, None, data.wnids),
                            estimate, neighbors, cfg.experiment.warmup_epochs, name=mode)
    rows = trainer.fit(val=val)
    seconds = time.perf_counter() - t0
    row = {"seconds": round(seconds, 1), "image_steps": _image_steps(cfg, trainer), "total_seconds": round(seconds, 1),
           "bytes_per_image": trainer.views.bytes_per_image}
    if val is not None:
        row.update(trainer.evaluate(*val))
        if rank0:
            log.info("%s: top-1 %.2f%%  top-5 %.2f%%", mode, row["top1"], row["top5"])
    weights = trainer.posterior.numpy()
    trainer.close()

    on_rank0(f"writing the {mode} weights", lambda: estimate.save(weights, os.path.join(cfg.run_dir, f"weights_{mode}.tsv")),
             device)
    history = comm.gather_objects(estimate.history if rank0 else None)[0]  # rank 0 made them
    row["estimates"] = history
    if history and history[-1].get("auc") is not None:
        row["weights_auc"] = history[-1]["auc"]
    return {mode: row}, {mode: {"train": rows, "val": trainer.eval_rows}}


class OnlineEstimate:
    """The weights `OnlineTrainer` asks for, on rank 0 (megaclass.weighting.online): with views None the
    start weights (`online`: rank and the page text against the label's K nearest categories;
    `online_loss`: 1), then from the forward passes' views, EM starting from `current`, the weights
    in use. Each estimate's details (EM steps, clean
    rate, AUC against data.root's truth where there is one) go to `history`."""

    def __init__(self, cfg: Config, data: RunData, info: WebVision, neighbors):
        self.cfg, self.info, self.neighbors = cfg, info, neighbors
        self.mode = cfg.experiment.mode
        self.paths, self.labels = data.paths, data.labels.numpy()
        self.history: list[dict] = []
        self._row = self._text = self._truth = None

    def _prepare(self) -> None:
        """Where each training image's side information is, and (`online`) the text features, once."""
        import numpy as np

        from megaclass.data.columns import as_string_column, lookup
        from megaclass.weighting.pipeline import truth_labels

        row = lookup(self.info.train.paths, as_string_column(self.paths))
        if (row < 0).any():
            raise ValueError(f"no side information for {int((row < 0).sum())} training images, e.g. "
                             f"{self.paths[int(np.argmax(row < 0))]!r}")
        self._row = row
        self._truth = truth_labels(self.cfg.data.root, self.paths)  # read once, not at every re-estimate
        if self.mode == "online" and self.cfg.experiment.online_text:
            from megaclass.weighting.keywords import KeywordExtractor
            from megaclass.weighting.pipeline import train_keyword_bags
            from megaclass.weighting.stage2 import Stage2Config, TextMargins, class_descriptions

            extractor, budget = KeywordExtractor(), Stage2Config()
            bags = train_keyword_bags(self.info, extractor, workers=1)  # no fork inside a distributed rank
            class_kw = [extractor(text) for text in class_descriptions(self.info.synsets)]
            self._text = TextMargins(bags, class_kw, None, budget.min_df, budget.max_vocabulary,
                                     progress=self.cfg.train.progress)

    def __call__(self, views: dict | None, epoch: int, current=None):
        import numpy as np

        from megaclass.weighting.metrics import roc_auc
        from megaclass.weighting.online import loss_weights, online_weights

        if self._row is None:
            self._prepare()
        details: dict = {"epoch": epoch}
        if self.mode == "online_loss":
            w = np.ones(len(self.labels)) if views is None else loss_weights(views["loss"], self.cfg.train.seed, details)
        else:
            row, train = self._row, self.info.train
            info_labels = train.labels.astype(np.int64)
            k = self.cfg.eval.topk
            alternatives = np.full((len(info_labels), max(self.neighbors.shape[1], k)), -1, dtype=np.int64)
            alternatives[:, :self.neighbors.shape[1]] = self.neighbors[info_labels]
            cell = p_label = None
            if views is not None:  # against the latest top-k where the model has seen the image, as stage 2
                seen = row[views["seen"]]
                alternatives[seen] = -1
                alternatives[seen, :k] = views["top_k"][views["seen"]]
                cell, p_label = views["cell"], views["p_label"]
            # without the page text (online_text: false) every image's margin says nothing
            margin = self._text(info_labels, alternatives)[row] if self._text is not None else np.full(len(row), np.nan)
            w = online_weights(np.asarray(train.sources)[row], np.asarray(train.ranks)[row], margin, cell, p_label,
                               current, details, self.cfg.experiment.online_em)
        if self._truth is not None:
            known, clean = self._truth
            details["auc"] = roc_auc(w[known], clean[known])
        else:
            details["auc"] = None
        self.history.append(details)
        log.info("%s weights after epoch %d: mean %.3f%s", self.mode, epoch, float(np.mean(w)),
                 "" if details["auc"] is None else f", AUC clean vs noisy {details['auc']:.4f}")
        return w

    def save(self, weights, out: str) -> None:
        from megaclass.weighting.tables import write_weights

        write_weights(out, self.paths, weights)
