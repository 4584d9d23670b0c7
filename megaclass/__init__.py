"""megaclass: million-class image classification on noisy web data.

Layers, imports pointing down this list only: kernels (`megaclass._C`) -> `ops` -> `parallel`
-> `nn` -> `models` -> `engine` -> entry points (`launch/train.py`, `megaclass.cli`).
`data`, `semantics` and `weighting` feed the engine.
"""
__version__ = "0.1.0"
