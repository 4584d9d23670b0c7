"""The fused class-sharded, sample-weighted linear cross-entropy op.

`linear_cross_entropy` is the public function (`linear_cross_entropy_gathered`: its data-parallel layout); `kernels` holds the three per-chunk kernels (from
`megaclass._C`, else their PyTorch twin).
"""
from megaclass.ops.lce import linear_cross_entropy, linear_cross_entropy_gathered

__all__ = ["linear_cross_entropy", "linear_cross_entropy_gathered"]
