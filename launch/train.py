"""`deepspeed launch/train.py --config configs/<name>.yaml [--set key=value ...]`: the same as
`megaclass train` / `deepspeed --module megaclass.train` (see megaclass/train.py for every launcher)."""
import sys

from megaclass.train import main

if __name__ == "__main__":
    sys.exit(main())
