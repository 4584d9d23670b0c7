"""Process groups and the autograd-aware collectives. `comm` is the only module that calls torch.distributed."""
from megaclass.parallel.comm import (
    all_gather_stacked,
    all_reduce_,
    all_reduce_grad,
    barrier,
    gather_ints,
    gather_rows,
    is_initialized,
    rank,
    reduce_rows,
    split_rows,
    world_size,
)

__all__ = [
    "all_gather_stacked",
    "all_reduce_",
    "all_reduce_grad",
    "barrier",
    "gather_ints",
    "gather_rows",
    "is_initialized",
    "rank",
    "reduce_rows",
    "split_rows",
    "world_size",
]
