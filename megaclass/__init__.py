"""megaclass: million-class image classification on noisy web data.

Layers, each importing only from those before it: kernels (`megaclass._C`) -> `ops` -> `nn`
-> `models` -> `engine` -> entry points (`launch/train.py`, `megaclass.cli`, `megaclass.bench`).
`parallel.comm` owns every torch.distributed call and imports nothing from megaclass, so `ops` (the
cross-rank combine) and every layer above it use it. `data`, `semantics` and `weighting` feed the
engine; `io` (atomic writes) serves all.
"""
__version__ = "0.1.0"
