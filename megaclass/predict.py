"""Top-k predictions of a trained model on the training images -> PRED_TSV, the file that
`megaclass weights --predictions` reads (the experiment's `predictions_train.tsv` format:
`<image path><TAB><wnid>:<prob> <wnid>:<prob> …`, best first), on every rank:

    megaclass predict --config configs/demo.yaml --checkpoint runs/demo/baseline --data DIR --out PRED.tsv
    deepspeed --num_gpus N --module megaclass.predict --config ... --checkpoint ... --out PRED.tsv

--checkpoint takes a checkpoint folder (`run_dir/checkpoints/step-…`), a `checkpoints` folder or a run
folder (then the checkpoint its `latest` names). The config must describe the model that was trained
(model, head); the images are those of data.root (or --data), without augmentation, with the
config's data.limit_train.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from megaclass.argtypes import output_file, positive_int
from megaclass.train import add_arguments

log = logging.getLogger("megaclass.predict")  # not __name__: "__main__" under python -m


def _add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoint folder, a checkpoints folder or a run folder (its latest checkpoint)")
    parser.add_argument("--data", metavar="ROOT", default=None, help="WebVision-layout data root (default: data.root)")
    parser.add_argument("--out", required=True, type=output_file, metavar="PRED_TSV", help="where to write the predictions (atomically)")
    parser.add_argument("--topk", type=positive_int, default=None, metavar="K", help="classes per image (default: eval.topk)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="a checkpoint's top-k on the training images -> PRED.tsv",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_predict_arguments(parser)
    parser.set_defaults(func=run)


def checkpoint_folder(path: str) -> str:
    """The checkpoint `path` names: itself (it holds meta.json), or the one `latest` names in `path`
    or in `path/checkpoints`."""
    from megaclass.engine.checkpoint import latest_checkpoint

    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    for root in (path, os.path.join(path, "checkpoints")):
        folder = latest_checkpoint(root)
        if folder is not None:
            return folder
    raise FileNotFoundError(f"--checkpoint {path}: neither a checkpoint (meta.json) nor a folder whose latest "
                            f"or checkpoints/latest names one")


def run(args: argparse.Namespace) -> int:
    import json

    from megaclass import log as logs
    from megaclass.engine import distributed
    from megaclass.engine.data import start_run
    from megaclass.engine.pipeline import trainer_class
    from megaclass.engine.trainer import TrainData
    from megaclass.parallel import comm
    from megaclass.weighting.tables import write_predictions

    logs.setup()
    if args.topk is not None and args.topk < 1:
        log.error("--topk: must be at least 1, got %d", args.topk)
        return 2
    overrides = list(args.overrides) + ([f"data.root={json.dumps(args.data)}"] if args.data else [])
    try:
        folder = checkpoint_folder(args.checkpoint)
        cfg, data = start_run(args.config, overrides)
        k = min(args.topk or cfg.eval.topk, data.num_classes)
        trainer = trainer_class(cfg)(cfg, TrainData(data.train_eval, data.num_classes, data.labels, wnids=data.wnids),
                                     name="predict")
        step = trainer.load(folder)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    log.info("predicting %d training images with %s (step %d)", len(data.train_eval), folder, step)
    probs, classes = trainer.predict(data.train_eval, k)
    if comm.rank() == 0:
        write_predictions(args.out, data.paths, data.wnids, classes.numpy(), probs.numpy())
        print(f"wrote {args.out}: top-{k} of {len(data.paths)} training images", flush=True)
    trainer.close()
    distributed.finish()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megaclass.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_predict_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
