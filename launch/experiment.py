"""The seed's experiment (baseline -> +Stage1 -> +Stage1+Stage2) on every rank:

    deepspeed --num_gpus 2 launch/experiment.py --config configs/demo.yaml --set data.root=DIR

See megaclass/engine/experiment.py for the steps and outputs."""
import sys

from megaclass.engine.experiment import main

if __name__ == "__main__":
    sys.exit(main())
