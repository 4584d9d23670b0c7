"""Train one model: `megaclass train --config CONFIG.yaml [--set key=value ...]`, on every rank.

    one process:        megaclass train --config configs/demo.yaml --set data.root=DIR
    one node, N ranks:  deepspeed --num_gpus N --module megaclass.train --config configs/webvision2_resnext101.yaml
    many nodes:         deepspeed --hostfile launch/hostfile.example --module megaclass.train --config ...
    torchrun:           torchrun --nproc_per_node N -m megaclass.train --config ...
    MPI:                mpirun -n N python -m megaclass.train --config ...

Resumes from `run_dir/checkpoints/latest` when it exists (train.resume). The final line reports the
class-balanced top-1/top-5 on the validation set (also written to `run_dir/eval.json`).
"""
from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("megaclass.train")  # not __name__: "__main__" under python -m


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every run command shares (train, experiment, predict)."""
    parser.add_argument("--config", required=True, help="YAML run config (see configs/); validated, unknown keys are errors")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.epochs=2 (repeatable; values are YAML)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    return parser


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    parser.add_argument("--no-eval", action="store_true", help="skip the final validation")


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train one model (every rank runs it)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import os

    from megaclass import log as logs
    from megaclass.engine import distributed, faults
    from megaclass.engine.data import skipped_samples, start_run
    from megaclass.engine.pipeline import trainer_class
    from megaclass.engine.trainer import TrainData
    from megaclass.io import atomic_write_text
    from megaclass.parallel import comm

    logs.setup()
    try:
        cfg, data = start_run(args.config, args.overrides)
        trainer = trainer_class(cfg)(cfg, TrainData(data.train, data.num_classes, data.labels,
                                                    data.sample_weights, data.wnids))
        trainer.fit(val=(data.val, data.val_labels) if len(data.val_labels) else None)
    except (OSError, ValueError) as exc:  # bad input, or a checkpoint that cannot resume here (every rank alike)
        log.error("%s", exc)
        return 2
    except faults.Preempted as exc:
        log.warning("%s", exc)
        distributed.finish()
        return faults.REQUEUE_EXIT
    except RuntimeError as exc:  # a peer's connection closed? the heartbeat names the lost rank and exits
        if comm.failed_in_collective(exc):
            faults.await_lost_rank()
        raise
    skipped = skipped_samples(data.train, trainer.device)
    if skipped:
        log.warning("training: %d samples did not decode and were skipped (all ranks)", skipped)
    if not args.no_eval and len(data.val_labels):
        data.val.skips.zero_()  # count the final evaluation alone
        result = trainer.evaluate(data.val, data.val_labels)
        result["skipped"] = skipped_samples(data.val, trainer.device)
        if comm.rank() == 0:
            atomic_write_text(os.path.join(cfg.run_dir, "eval.json"), json.dumps(result))
            print(f"validation: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%", flush=True)
    distributed.finish()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megaclass.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
