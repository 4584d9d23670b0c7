"""The seed's experiment, baseline -> +Stage1 -> +Stage1+Stage2, on every rank:

    one process:        megaclass experiment --config configs/demo.yaml --set data.root=DIR
    one node, N ranks:  deepspeed --num_gpus N --module megaclass.experiment --config configs/demo.yaml --set data.root=DIR
    torchrun / MPI:     torchrun --nproc_per_node N -m megaclass.experiment ...; mpirun -n N python -m megaclass.experiment ...

Writes `run_dir/results.json`, `weights_stage1.tsv`, `weights_stage2.tsv`, `curves.png` and one folder
per run; see megaclass/engine/experiment.py for the steps.

One training instead of three: `--set experiment.mode=online` (weights re-estimated at each epoch end
from the rank, the page text and the training forward passes' predictions) or `online_loss` (the
per-image loss alone); into the same run_dir, their row joins the staged ones in results.json.
"""
from __future__ import annotations

import argparse
import logging
import sys

from megaclass.train import add_arguments

log = logging.getLogger("megaclass.experiment")  # not __name__: "__main__" under python -m


def register(subparsers) -> None:
    parser = subparsers.add_parser("experiment", help="baseline -> +Stage1 -> +Stage1+Stage2, or one online training "
                                   "(every rank runs it)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megaclass import log as logs
    from megaclass.engine import distributed
    from megaclass.engine import faults
    from megaclass.engine.data import start_run
    from megaclass.engine.experiment import StepFailed, oracle_weights, run as run_experiment

    logs.setup()
    try:
        cfg, data = start_run(args.config, args.overrides)
        if len(data.val_labels) == 0:
            where = (f"{cfg.data.shards}/index.json's val split" if cfg.data.shards
                     else f"{cfg.data.root}/info/val_filelist.txt")
            raise ValueError(f"{where}: no validation images to evaluate on")
        # read here, where a missing or short truth file is a clean error, and once
        oracle = oracle_weights(cfg, data.paths) if cfg.experiment.oracle else None
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    from megaclass.parallel import comm

    try:
        run_experiment(cfg, data, oracle)
    except StepFailed as exc:
        log.error("%s", exc)
        return 1
    except faults.Preempted as exc:  # the next run resumes the model in training; finished ones are kept
        log.warning("%s", exc)
        distributed.finish()
        return faults.REQUEUE_EXIT
    except RuntimeError as exc:  # a peer's connection closed? the heartbeat names the lost rank and exits
        if comm.failed_in_collective(exc):
            faults.await_lost_rank()
        raise
    distributed.finish()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megaclass.experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
