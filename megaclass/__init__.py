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

import sys as _sys


class _TorchBeforeExtension:
    """Imports torch before `megaclass._C`: the library links against torch's shared libraries (libc10,
    libtorch), which only `import torch` loads, so `import megaclass._C` works on its own, while
    `import megaclass` stays free of torch (the CLI's start)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "megaclass._C":
            import torch  # noqa: F401
        return None  # the ordinary finders locate the library


if not any(getattr(f, "__qualname__", None) == "_TorchBeforeExtension" for f in _sys.meta_path):  # once
    _sys.meta_path.insert(0, _TorchBeforeExtension)
