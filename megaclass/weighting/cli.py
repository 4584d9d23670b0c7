"""`megaclass weights`: stage-1 / stage-2 per-image loss weights -> OUT_TSV (+ a PNG beside it)."""
from __future__ import annotations

import logging
import sys

from megaclass.argtypes import output_file, positive_int


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "weights", help="stage-1 / stage-2 per-image loss weights -> weights.tsv",
        description="Per-image loss weights for every training image of a WebVision-layout data set. "
                    "Stage 1: P(label is right) from the search rank and where the model's predictions fall (the "
                    "label, its WordNet nearest categories, elsewhere), estimated by EM on the training data "
                    "itself. Stage 2: the stage-1 weight plus the evidence of the keyword text (title, "
                    "description, tags) matched against the label's and the predicted classes' text. "
                    "See docs/weighting.md. Writes OUT_TSV "
                    "(`<image path><TAB><weight>`) and OUT_TSV with .png: weight histograms (clean vs noisy "
                    "when ROOT/truth_train.tsv exists) and the highest/lowest-weighted images of a few classes.")
    parser.add_argument("--data", required=True, metavar="ROOT", help="data set root (holds info/synsets.txt)")
    parser.add_argument("--knn", required=True, metavar="KNN_TSV",
                        help="K nearest categories, `wnid<TAB>neighbor_wnid<TAB>score` (megaclass semantics)")
    parser.add_argument("--predictions", required=True, metavar="PRED_TSV",
                        help="model predictions on the training images, "
                             "`<image path><TAB><wnid>:<prob> <wnid>:<prob> …` (top k, best first)")
    parser.add_argument("--stage", required=True, type=int, choices=(1, 2),
                        help="1: rank + predictions vs KNN; 2: stage 1's evidence + keyword text")
    parser.add_argument("--stage1", default=None, metavar="STAGE1_TSV",
                        help="stage 2 only: the stage-1 weights (OUT_TSV of --stage 1) that the text evidence is "
                             "added to; PRED_TSV is then the stage-1 model's. Default: stage 1 from PRED_TSV")
    parser.add_argument("--out", required=True, type=output_file, metavar="OUT_TSV", help="where to write the weights (atomically); the PNG goes beside it")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--workers", type=positive_int, default=None, metavar="W",
                        help="stage 2: processes that extract the keywords, in blocks of 262,144 images "
                             "(default: the CPUs this process may use; the result does not depend on W)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from megaclass.semantics import KnnFileError
    from megaclass.weighting.pipeline import WeightingInputError, compute_weights, save_weights
    from megaclass.weighting.tables import TableError

    from megaclass import log

    log.setup()
    try:
        if args.stage1 and args.stage != 2:
            raise ValueError("--stage1 is for --stage 2 only")
        result = compute_weights(args.data, args.knn, args.predictions, args.stage, progress=True,
                                 stage1_tsv=args.stage1, drop_text=True, workers=args.workers)
    except (OSError, ValueError, KnnFileError, TableError, WeightingInputError) as exc:
        print(f"megaclass weights: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("megaclass.weighting").info("%s", result.data.summary())
    line = save_weights(result, args.data, args.out, plot=not args.no_plot)
    print(line, *(f"{k}={v}" for k, v in result.notes.items()))
    return 0
