"""Process groups and the autograd-aware collectives. `comm` is the only module that calls torch.distributed."""
from megaclass.parallel.comm import (
    all_gather_stacked,
    all_reduce_,
    barrier,
    gather_ints,
    gather_rows,
    is_initialized,
    rank,
    world_size,
)

__all__ = [
    "all_gather_stacked",
    "all_reduce_",
    "barrier",
    "gather_ints",
    "gather_rows",
    "is_initialized",
    "rank",
    "world_size",
]
