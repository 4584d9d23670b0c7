"""Every torch.distributed call in megaclass lives here.

Naming: a *group* is a torch.distributed process group (None = the default group when one is
initialized, else a group of one). Row collectives work on dim 0.

Autograd functions, each forward mirrored by its backward (Megatron's mappings.py):
  gather_rows     forward: all-gather rows        backward: reduce-scatter (sum) rows
  scale_grad      forward: identity               backward: multiply by a constant (local)
gather_rows is a no-op for a group of one. Gloo has no reduce-scatter, so there it is an all-reduce
followed by taking this rank's slice (same result, twice the traffic).
"""
from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_group(backend: str, rank: int, world: int, address: str = "127.0.0.1", port: int = 29500) -> None:
    """Join a group of `world` ranks at tcp://address:port (tools that start their own ranks, e.g. benchmarks)."""
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world)


def destroy_group() -> None:
    if is_initialized():
        dist.destroy_process_group()


def default_group():
    """The default (world) group when torch.distributed is initialized, else None (a group of one)."""
    return dist.group.WORLD if is_initialized() else None


def group_name(group) -> str:
    """The name torch.distributed knows `group` by ("" for None, a group of one): how a torch.library op,
    which takes no Python objects, receives its group."""
    return "" if group is None else group.group_name


def group_by_name(name: str):
    """The group of `group_name` (None for "")."""
    return None if not name else dist.distributed_c10d._resolve_process_group(name)


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def barrier(group=None) -> None:
    if world_size(group) > 1:
        dist.barrier(group)


def backend(group=None) -> str:
    return dist.get_backend(group) if is_initialized() else "none"


def all_reduce_(tensor: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce without autograd; returns `tensor`."""
    if world_size(group) > 1:
        dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In-place broadcast from global rank `src` without autograd; returns `tensor`."""
    if world_size(group) > 1:
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def any_rank(flag: bool, device: torch.device | str = "cpu", group=None) -> bool:
    """True on every rank when `flag` is True on any rank: one all-reduce (max) of one element."""
    local = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    return bool(all_reduce_(local, group, op="max").item())


def failed_in_collective(exc: BaseException) -> bool:
    """Whether `exc` was raised inside torch.distributed (gloo raises a plain RuntimeError when a peer's
    connection closes), as opposed to an error of the caller's own."""
    if isinstance(exc, dist.DistError):
        return True
    here = os.path.dirname(dist.__file__)
    return any(frame.filename.startswith(here) for frame in traceback.extract_tb(exc.__traceback__))


def store_client(address: str, port: int, timeout_s: float, prefix: str):
    """A connection of its own to the TCP store at address:port (e.g. the job's rendezvous store), whose
    operations give up after `timeout_s`, under key `prefix`."""
    store = dist.TCPStore(address, port, is_master=False, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    return dist.PrefixStore(prefix, store)


def all_gather_stacked(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """[*shape] on every rank -> [P, *shape], rank order; no autograd. Shapes must match."""
    p = world_size(group)
    if p == 1:
        return tensor.unsqueeze(0)
    flat = tensor.contiguous().view(-1)
    out = torch.empty(p * flat.numel(), dtype=tensor.dtype, device=tensor.device)
    _all_gather_single(out, flat, group=group)  # concatenated form: gloo rejects the stacked one
    return out.view(p, *tensor.shape)


def gather_ints(values: Sequence[int], device: torch.device | str = "cpu", group=None) -> list[list[int]]:
    """Each rank's small integer tuple, on every rank (rank order). Used to validate shapes and shards
    identically everywhere, so that bad input raises on every rank instead of hanging one of them."""
    local = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    return all_gather_stacked(local, group).cpu().tolist()


def gather_objects(obj, group=None) -> list:
    """Each rank's small picklable object (a message, or None), on every rank in rank order: how the
    ranks agree on what only one of them saw (a failed write), so that all act alike."""
    if world_size(group) == 1:
        return [obj]
    out = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_objects_to(obj, dst: int = 0, group=None) -> list | None:
    """Each rank's picklable object, on global rank `dst` alone (rank order; None elsewhere): per-rank
    state too large to copy to every rank."""
    if world_size(group) == 1:
        return [obj]
    out = [None] * world_size(group) if rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


def _reduce_scatter_rows(x: torch.Tensor, group) -> torch.Tensor:
    p = world_size(group)
    if x.shape[0] % p:
        raise ValueError(f"reduce-scatter needs rows divisible by the group size: {x.shape[0]} rows, {p} ranks")
    rows = x.shape[0] // p
    if backend(group) == "gloo":
        total = x.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total.narrow(0, rank(group) * rows, rows).contiguous()
    out = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    stacked = all_gather_stacked(x, group)
    return stacked.reshape(-1, *x.shape[1:])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(grad, ctx.group), None


def gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """[n, ...] per rank -> [P·n, ...] on every rank; the backward sums the gradient over ranks
    and returns each rank its own rows (reduce-scatter). Every rank must pass the same n."""
    return x if world_size(group) == 1 else _GatherRows.apply(x, group)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; backward multiplies the gradient by `factor` (e.g. P, undoing a data-parallel mean)."""
    return x if factor == 1 else _ScaleGrad.apply(x, factor)


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on `host` ("" = every interface), for tools that form their own group
    (`init_group`) and for a job's rendezvous store."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
