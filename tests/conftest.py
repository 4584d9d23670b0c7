import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/dist_utils.py
# DeepSpeed's JIT ops cached per virtual environment (as `make` does), inherited by spawned ranks
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
