"""Train one model: `deepspeed launch/train.py --config configs/<name>.yaml [--set key=value ...]`.

    one node, N ranks:  deepspeed --num_gpus N launch/train.py --config configs/webvision2_resnext101.yaml
    many nodes:         deepspeed --hostfile launch/hostfile.example launch/train.py --config ...
    torchrun:           torchrun --nproc_per_node N launch/train.py --config ...
    MPI:                mpirun -n N python launch/train.py --config ...
    one process:        python launch/train.py --config configs/demo.yaml --set data.root=DIR

Resumes from `run_dir/checkpoints/latest` when it exists (train.resume). The final line reports the
class-balanced top-1/top-5 on the validation set.
"""
import argparse
import json
import os
import sys

from megaclass.engine import distributed
from megaclass.engine.data import start_run
from megaclass.engine.pipeline import trainer_class
from megaclass.engine.trainer import TrainData
from megaclass.io import atomic_write_text
from megaclass.parallel import comm


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/); validated, unknown keys are errors")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.epochs=2 (repeatable; values are YAML)")
    parser.add_argument("--no-eval", action="store_true", help="skip the final validation")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        cfg, data = start_run(args.config, args.overrides)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    trainer = trainer_class(cfg)(cfg, TrainData(data.train, data.webvision.num_classes, data.labels, data.sample_weights))
    try:
        trainer.fit(val=(data.val, data.val_labels) if len(data.val_labels) else None)
    except (OSError, ValueError) as exc:  # e.g. a checkpoint that cannot resume here (every rank reads it alike)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.no_eval and len(data.val_labels):
        result = trainer.evaluate(data.val, data.val_labels)
        if comm.rank() == 0:
            atomic_write_text(os.path.join(cfg.run_dir, "eval.json"), json.dumps(result))
            print(f"validation: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%")
    distributed.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
