"""`deepspeed --num_gpus 2 launch/experiment.py --config configs/demo.yaml --set data.root=DIR`: the same
as `megaclass experiment` / `deepspeed --module megaclass.experiment` (see megaclass/experiment.py)."""
import sys

from megaclass.experiment import main

if __name__ == "__main__":
    sys.exit(main())
