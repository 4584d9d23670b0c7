"""From files to weights: a WebVision-layout data set + knn.tsv + predictions -> one weight per
training image (`compute_weights`), as `megaclass weights` runs it."""
from __future__ import annotations

import logging
import multiprocessing
import os
from array import array
from dataclasses import dataclass, field

import numpy as np

from megaclass.data.columns import array_column, lookup
from megaclass.data.metadata import load_metadata
from megaclass.data.webvision import WebVision
from megaclass.weighting.estimate import clip01
from megaclass.weighting.stage1 import knn_arrays, stage1_weights
from megaclass.weighting.stage2 import Stage2Config, class_descriptions, keyword_bags, stage2_from_margins, text_margins
from megaclass.weighting.tables import read_predictions, read_weight_column
from megaclass.weighting.text import KeywordBags

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
    def paths(self):
        """The images' paths, a `StringColumn` in the order of `weights`."""
        return self.data.train.paths


def compute_weights(root: str | os.PathLike, knn_tsv: str | os.PathLike, predictions_tsv: str | os.PathLike,
                    stage: int, data: WebVision | None = None, embeddings=None,
                    stage2: Stage2Config = Stage2Config(), progress: bool = False,
                    stage1_tsv: str | os.PathLike | None = None, drop_text: bool = False,
                    workers: int | None = None) -> WeightsResult:
    """Stage-1 or stage-2 weights for every training image of the data set at `root` (a WebVision-layout
    root or a shards folder, `megaclass.data.metadata`). Stage 2 adds
    the text evidence to the stage-1 weights in `stage1_tsv` (OUT_TSV of a stage-1 run; the
    predictions are then the stage-1 model's), or without it to stage 1 computed from the same
    predictions. `stage2` bounds the text features' compute. With `drop_text`, the descriptions and tags
    of `data.train` (the bulk of its text) are freed before the predictions are read: stage 1 never uses
    them, stage 2 once its keyword bags exist (`TrainColumns.drop_text`). `workers`: processes that
    extract the keywords (`train_keyword_bags`)."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    from megaclass.semantics import read_knn_tsv

    data = data or load_metadata(root, progress=progress)
    if not len(data.train):
        raise WeightingInputError(f"{root}: no training images")
    knn = read_knn_tsv(knn_tsv)
    neighbors, scores = knn_arrays(data.wnids, knn)
    known = sum(w in knn for w in data.wnids)
    if known == 0:
        raise WeightingInputError(f"{knn_tsv}: none of the {data.num_classes} classes of {root} has neighbours "
                                  f"there; was it made from another synsets.txt?")
    keyword_details: dict = {}
    if stage == 2:
        from megaclass.weighting.keywords import KeywordExtractor

        extractor = KeywordExtractor()
        image_kw = train_keyword_bags(data, extractor, workers, keyword_details)
    if drop_text:  # before the predictions' columns exist: the two never share the peak
        data.train.drop_text()
    preds = read_predictions(predictions_tsv, data.wnids)
    paths = data.train.paths
    pred_classes, pred_probs, found = preds.align(paths)
    if not found.any():
        raise WeightingInputError(f"{predictions_tsv}: no row names a training image of {root} "
                                  f"(first row: {preds.paths[0]!r}, first image: {paths[0]!r})")
    del preds  # aligned now: its own columns (~100 bytes an image) are not needed again
    notes = {"images": len(paths), "without_predictions": int((~found).sum()),
             "classes_without_neighbours": data.num_classes - known, **keyword_details}
    if notes["without_predictions"]:
        log.warning("%d of %d training images have no prediction row in %s; they keep their rank prior",
                    notes["without_predictions"], len(paths), predictions_tsv)
    labels = data.train.labels.astype(np.int64)
    details: dict = {}
    if stage == 1 or stage1_tsv is None:
        weights = stage1_weights(labels, data.train.sources, data.train.ranks, pred_classes, pred_probs, neighbors, scores, details)
        notes.update(clean_rate=round(details["clean_rate"], 4), em_images=details["em_images"],
                     em_steps=details["em_iterations"],
                     em_mean_change=details["em_mean_change"], em_converged=details["em_converged"])
    else:
        weights = _stage1_from_file(stage1_tsv, paths)
    if stage == 2:
        class_kw = [extractor(text) for text in class_descriptions(data.synsets)]
        notes["without_keywords"] = int((image_kw.lengths() == 0).sum())
        margin = text_margins(image_kw, class_kw, labels, pred_classes, embeddings, stage2.min_df,
                              stage2.max_vocabulary, progress=progress)
        del image_kw
        weights = stage2_from_margins(weights, margin, details)
        notes.update(pages_with_text_evidence=round(details["pages_with_margin"], 4),
                     text_em_steps=details["em_iterations"], text_em_mean_change=details["em_mean_change"],
                     text_em_converged=details["em_converged"])
    return WeightsResult(data, weights, stage, notes)


def query_or_class_texts(data: WebVision, block: int = 65536, start: int = 0, stop: int | None = None):
    """Each image's query text, or its class's names where the query's text is unknown (streamed), for
    training images start..stop-1 (default all)."""
    query_texts, names = data.query_texts(), [text for _, text in data.synsets]
    stop = len(data.train) if stop is None else stop
    for lo in range(start, stop, block):
        hi = min(lo + block, stop)
        queries, labels = data.train.queries[lo:hi].tolist(), data.train.labels[lo:hi].tolist()
        yield from (query_texts[q] or names[y] for q, y in zip(queries, labels))


KEYWORD_BLOCK = 1 << 18
_SHARED: tuple | None = None  # (data, extractor) for the forked workers of `train_keyword_bags`


def train_keyword_bags(data: WebVision, extractor, workers: int | None = None,
                       details: dict | None = None) -> KeywordBags:
    """`keyword_bags` of every training image of `data` (title, description and tags minus the query's
    words), by `workers` processes (default: the CPUs this process may run on) over blocks of
    `KEYWORD_BLOCK` images taken in order, so that the bags and the vocabulary's order are exactly one
    process's: each block's new words join the vocabulary in their order of first sight. Forked workers
    share the columns and the extractor's loaded WordNet; only each block's keyword ids come back.
    `details`, when given, receives `workers_private_bytes`: the sum over the workers of the most
    private memory each held after a block (what they added to the machine beside this process)."""
    n = len(data.train)
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    if workers < 2 or n <= KEYWORD_BLOCK:
        return _block_bags(0, data, extractor)
    global _SHARED
    extractor("warm up wordnet")  # loaded once, before the fork
    _SHARED = (data, extractor)
    index: dict[str, int] = {}
    ids, offsets = array("i"), array("q", [0])
    private: dict[int, int] = {}
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for block, pid, held in pool.imap(_shared_block_bags, range(0, n, KEYWORD_BLOCK)):
                private[pid] = max(private.get(pid, 0), held)
                to_global = np.array([index.setdefault(w, len(index)) for w in block.words], dtype=np.int32)
                ids.frombytes(to_global[block.ids].tobytes())
                offsets.frombytes((block.offsets[1:] + offsets[-1]).tobytes())
    finally:
        _SHARED = None
    if details is not None:
        details["workers_private_bytes"] = sum(private.values())
    return KeywordBags(list(index), array_column(ids, np.int32), array_column(offsets, np.int64))


def _block_bags(start: int, data: WebVision, extractor, size: int | None = None) -> KeywordBags:
    stop = len(data.train) if size is None else min(start + size, len(data.train))
    train = data.train
    return keyword_bags(extractor, train.titles.slice(start, stop), train.descriptions.slice(start, stop),
                        train.tags.slice(start, stop), query_or_class_texts(data, start=start, stop=stop))


def _shared_block_bags(start: int) -> tuple[KeywordBags, int, int]:
    from megaclass.memory import private_bytes

    data, extractor = _SHARED
    bags = _block_bags(start, data, extractor, KEYWORD_BLOCK)
    return bags, os.getpid(), private_bytes()


def _stage1_from_file(path: str | os.PathLike, paths) -> np.ndarray:
    """The stage-1 weights of `paths`, in that order, from OUT_TSV; every image must be there."""
    images, table = read_weight_column(path)
    row = lookup(images, paths)
    missing = row < 0
    weights = np.full(len(row), np.nan)
    weights[~missing] = table[row[~missing]]
    if missing.any():
        raise WeightingInputError(f"{path}: no stage-1 weight for {int(missing.sum())} of {len(paths)} training "
                                  f"images (first: {paths[int(np.argmax(missing))]!r}); was it written for this "
                                  f"data set?")
    if np.any(weights > 1):
        raise WeightingInputError(f"{path}: stage-1 weights are posteriors in [0, 1], found {weights.max()}")
    return clip01(weights)


def truth_labels(root: str | os.PathLike, paths) -> tuple[np.ndarray, np.ndarray] | None:
    """(known [N], clean [N]) of `paths` where `root` has a `truth_train.tsv` (synthetic data): whether
    the file lists each image, and whether it is clean; None without one."""
    from megaclass.data.synth import read_truth

    truth = read_truth(root) if root else None
    if truth is None:
        return None
    known = np.fromiter((p in truth for p in paths), dtype=bool, count=len(paths))
    clean = np.fromiter((p in truth and truth[p].clean for p in paths), dtype=bool, count=len(paths))
    return known, clean


def truth_auc(root: str | os.PathLike, paths, weights: np.ndarray):
    """(AUC of `weights` for clean vs noisy images, known [N], clean [N]) where `root` has a
    `truth_train.tsv` (synthetic data), over the images it lists; (None, None, None) without one."""
    from megaclass.weighting.metrics import roc_auc

    labels = truth_labels(root, paths)
    if labels is None:
        return None, None, None
    known, clean = labels
    return roc_auc(weights[known], clean[known]), known, clean


def save_weights(result: WeightsResult, root: str | os.PathLike, out: str | os.PathLike, plot: bool = True) -> str:
    """Write OUT_TSV and (with `plot`) the PNG beside it; returns a one-line summary. When `root` has a
    `truth_train.tsv` (synthetic data) the line gives the AUC of the weights for clean vs noisy images,
    over the images that file lists: an image it lacks is unknown, not clean, and is left out (counted)."""
    from megaclass.weighting.plot import plot_weights
    from megaclass.weighting.tables import write_weights

    write_weights(out, result.paths, result.weights)
    result.auc, known, clean = truth_auc(root, result.paths, result.weights)
    line = f"stage {result.stage}: {len(result.weights)} weights, mean {result.weights.mean():.3f} -> {out}"
    if result.auc is not None:
        line += f"; AUC clean vs noisy {result.auc:.4f}"
        if not known.all():
            line += f" ({int((~known).sum())} images not in truth_train.tsv excluded)"
    if plot:
        png = os.path.splitext(out)[0] + ".png"
        plot_weights(png, root, result.data.train, result.weights, [t for _, t in result.data.synsets],
                     result.stage, clean, known)
        line += f"; plot -> {png}"
    return line
