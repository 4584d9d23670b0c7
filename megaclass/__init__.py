"""megaclass: million-class image classification on noisy web data.

Layers, each importing only from those before it: kernels (`megaclass._C`) -> `ops` -> `nn`
-> `models` -> `engine` -> entry points (`megaclass.train`, `megaclass.experiment`, `megaclass.predict`,
`megaclass.cli`, `megaclass.bench`; `launch/` holds script wrappers of the first two).
`parallel.comm` owns every torch.distributed call and imports nothing from megaclass, so `ops` (the
cross-rank combine) and every layer above it use it. `data`, `semantics` and `weighting` feed the
engine; `io` (durable atomic writes), `log` (rank-aware logging), `memory` (the memory probe) and
`seeding` (derived seeds) serve all and import nothing from megaclass.
"""
__version__ = "0.1.0"
