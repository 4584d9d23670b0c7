"""From files to weights: a WebVision-layout data set + knn.tsv + predictions -> one weight per
training image (`compute_weights`), as `megaclass weights` runs it."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from megaclass.data.webvision import WebVision, load_webvision
from megaclass.weighting.estimate import clip01
from megaclass.weighting.stage1 import knn_arrays, stage1_weights
from megaclass.weighting.stage2 import (Stage2Config, class_descriptions, image_keywords, stage2_weights,
                                        text_vectors)
from megaclass.weighting.tables import read_predictions, read_weights

log = logging.getLogger(__name__)


class WeightingInputError(ValueError):
    """The inputs do not fit together (predictions or knn.tsv made for other data)."""


@dataclass(slots=True)
class WeightsResult:
    data: WebVision
    weights: np.ndarray
    """[N] in the order of `data.train`"""
    stage: int
    notes: dict[str, object] = field(default_factory=dict)
    auc: float | None = None
    """AUC of the weights for clean vs noisy images, set by `save_weights` where the truth is known."""

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.data.train]


def compute_weights(root: str | os.PathLike, knn_tsv: str | os.PathLike, predictions_tsv: str | os.PathLike,
                    stage: int, data: WebVision | None = None, embeddings=None,
                    stage2: Stage2Config = Stage2Config(), progress: bool = False,
                    stage1_tsv: str | os.PathLike | None = None) -> WeightsResult:
    """Stage-1 or stage-2 weights for every training image of the data set at `root`. Stage 2 adds
    the text evidence to the stage-1 weights in `stage1_tsv` (OUT_TSV of a stage-1 run; the
    predictions are then the stage-1 model's), or without it to stage 1 computed from the same
    predictions. `stage2` bounds the text features' compute."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    from megaclass.semantics import read_knn_tsv

    data = data or load_webvision(root, progress=progress)
    if not data.train:
        raise WeightingInputError(f"{root}: no training images")
    knn = read_knn_tsv(knn_tsv)
    neighbors, scores = knn_arrays(data.wnids, knn)
    known = sum(w in knn for w in data.wnids)
    if known == 0:
        raise WeightingInputError(f"{knn_tsv}: none of the {data.num_classes} classes of {root} has neighbours "
                                  f"there; was it made from another synsets.txt?")
    preds = read_predictions(predictions_tsv, data.wnids)
    paths = [r.path for r in data.train]
    pred_classes, pred_probs, found = preds.align(paths)
    if not found.any():
        raise WeightingInputError(f"{predictions_tsv}: no row names a training image of {root} "
                                  f"(first row: {next(iter(preds.row))!r}, first image: {paths[0]!r})")
    notes = {"images": len(paths), "without_predictions": int((~found).sum()),
             "classes_without_neighbours": data.num_classes - known}
    if notes["without_predictions"]:
        log.warning("%d of %d training images have no prediction row in %s; they keep their rank prior",
                    notes["without_predictions"], len(paths), predictions_tsv)
    labels = np.array([r.label for r in data.train], dtype=np.int64)
    sources = [r.source for r in data.train]
    ranks = [r.rank for r in data.train]
    details: dict = {}
    if stage == 1 or stage1_tsv is None:
        weights = stage1_weights(labels, sources, ranks, pred_classes, pred_probs, neighbors, scores, details)
        notes.update(clean_rate=round(details["clean_rate"], 4), em_steps=details["em_iterations"])
    else:
        weights = _stage1_from_file(stage1_tsv, paths)
    if stage == 2:
        from megaclass.weighting.keywords import KeywordExtractor

        extractor = KeywordExtractor()
        records = data.train
        image_kw = image_keywords(extractor, [r.title for r in records], [r.description for r in records],
                                  [r.tags for r in records], [data.query_text(r) or data.synsets[r.label][1]
                                                              for r in records])
        class_kw = [extractor(text) for text in class_descriptions(data.synsets)]
        image_vectors, class_vectors = text_vectors(image_kw, class_kw, embeddings, stage2.min_df,
                                                    stage2.max_vocabulary, progress=progress)
        notes["without_keywords"] = sum(not ks for ks in image_kw)
        weights = stage2_weights(weights, labels, pred_classes, image_vectors, class_vectors, details)
        notes.update(pages_with_text_evidence=round(details["pages_with_margin"], 4),
                     text_em_steps=details["em_iterations"])
    return WeightsResult(data, weights, stage, notes)


def _stage1_from_file(path: str | os.PathLike, paths: list[str]) -> np.ndarray:
    """The stage-1 weights of `paths`, in that order, from OUT_TSV; every image must be there."""
    table = read_weights(path)
    missing = [p for p in paths if p not in table]
    if missing:
        raise WeightingInputError(f"{path}: no stage-1 weight for {len(missing)} of {len(paths)} training images "
                                  f"(first: {missing[0]!r}); was it written for this data set?")
    weights = np.array([table[p] for p in paths], dtype=np.float64)
    if np.any(weights > 1):
        raise WeightingInputError(f"{path}: stage-1 weights are posteriors in [0, 1], found {weights.max()}")
    return clip01(weights)


def save_weights(result: WeightsResult, root: str | os.PathLike, out: str | os.PathLike, plot: bool = True) -> str:
    """Write OUT_TSV and (with `plot`) the PNG beside it; returns a one-line summary. When `root` has a
    `truth_train.tsv` (synthetic data) the line gives the AUC of the weights for clean vs noisy images,
    over the images that file lists: an image it lacks is unknown, not clean, and is left out (counted)."""
    from megaclass.data.synth import read_truth
    from megaclass.weighting.metrics import roc_auc
    from megaclass.weighting.plot import plot_weights
    from megaclass.weighting.tables import write_weights

    write_weights(out, result.paths, result.weights)
    truth = read_truth(root)
    clean = known = None
    line = f"stage {result.stage}: {len(result.weights)} weights, mean {result.weights.mean():.3f} -> {out}"
    if truth is not None:
        known = np.array([p in truth for p in result.paths])
        clean = np.array([p in truth and truth[p].clean for p in result.paths])
        result.auc = roc_auc(result.weights[known], clean[known])
        line += f"; AUC clean vs noisy {result.auc:.4f}"
        if not known.all():
            line += f" ({int((~known).sum())} images not in truth_train.tsv excluded)"
    if plot:
        png = os.path.splitext(out)[0] + ".png"
        plot_weights(png, root, result.data.train, result.weights, [t for _, t in result.data.synsets],
                     result.stage, clean, known)
        line += f"; plot -> {png}"
    return line
