"""The three per-chunk kernels of the fused op, and the choice between `megaclass._C` and their twin.

Contract (the header of `csrc/megaclass_ops.cpp` is the authority):

  chunk_stats(logits, target, class_start, store_exp) -> stats
      logits: [R, C_local] contiguous, this rank's classes [class_start, class_start + C_local)
      target: [R] int64 global class ids (a target outside the shard contributes target logit 0)
      stats:  [4, R] fp32 (fp64 for fp64 logits): max_c z, Σ_c exp(z − max), z_target, Σ_c z
      store_exp: logits are overwritten with exp(z − max), so that the gradient pass needs no exp of
      its own (one exp per element in all).

  chunk_grad_(logits, target, class_start, shift, row_coef, target_coef, uniform_coef, stored_exp)
      in place: g[i, c] = row_coef[i] · (p[i, c] − target_coef·[c == target[i] − class_start] − uniform_coef)
      with p = exp(z − shift) (shift = lse), or p = e · exp(−shift) when stored_exp (shift = lse − max).

  chunk_stats_grad_(logits, target, row_coef, target_coef, uniform_coef) -> stats
      both, for a group of one rank (logits hold every class): the stats of chunk_stats, and logits
      turned into chunk_grad_'s gradient with shift = lse, each row in one visit (CPU kernel only).

The twins below are plain PyTorch with the same signatures and semantics; they run wherever the
extension has no kernel for the tensor's device or dtype (fp64 is twin-only), and in tests.
"""
from __future__ import annotations

import functools
import warnings

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IMPLEMENTATIONS = ("auto", "extension", "torch")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and d(weight) accumulate in fp32 (fp64 for fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _local_target(target: torch.Tensor, class_start: int, c_local: int):
    local = target - class_start
    inside = (local >= 0) & (local < c_local)
    return local.clamp(0, max(c_local - 1, 0)), inside


def chunk_stats_torch(logits: torch.Tensor, target: torch.Tensor, class_start: int, store_exp: bool) -> torch.Tensor:
    """PyTorch twin of `megaclass::lce_chunk_stats`; logits: [R, C_local] -> stats [4, R]."""
    rows, c_local = logits.shape
    acc = stats_dtype(logits.dtype)
    out = torch.zeros(4, rows, dtype=acc, device=logits.device)
    if c_local == 0:
        out[0].fill_(float("-inf"))
        return out
    local, inside = _local_target(target, class_start, c_local)
    z = logits.to(acc)
    out[3] = z.sum(1)
    out[2] = torch.where(inside, z.gather(1, local[:, None]).squeeze(1), 0)
    out[0] = z.amax(1)
    if store_exp and z.data_ptr() == logits.data_ptr():
        e = logits.sub_(out[0][:, None]).exp_()
    else:
        e = (z - out[0][:, None]).exp_()
        if store_exp:
            logits.copy_(e)
    out[1] = e.sum(1)
    return out


def chunk_grad_torch_(logits: torch.Tensor, target: torch.Tensor, class_start: int, shift: torch.Tensor,
                      row_coef: torch.Tensor, target_coef: float, uniform_coef: float, stored_exp: bool) -> None:
    """PyTorch twin of `megaclass::lce_chunk_grad_`: logits [R, C_local] become d loss / d logits in place."""
    rows, c_local = logits.shape
    if rows == 0 or c_local == 0:
        return
    acc = stats_dtype(logits.dtype)
    p = logits if logits.dtype == acc else logits.to(acc)
    if stored_exp:
        p = p.mul_(torch.exp(-shift)[:, None]) if p is logits else p.mul(torch.exp(-shift)[:, None])
    else:
        p = p.sub_(shift[:, None]).exp_() if p is logits else (p - shift[:, None]).exp_()
    if uniform_coef:
        p.sub_(uniform_coef)
    local, inside = _local_target(target, class_start, c_local)
    # a scatter rather than indexing with nonzero(): no host synchronisation on CUDA
    p.scatter_add_(1, local[:, None], inside.to(p.dtype)[:, None] * -target_coef)
    p.mul_(row_coef[:, None])
    if p is not logits:
        logits.copy_(p)


def chunk_stats_grad_torch_(logits: torch.Tensor, target: torch.Tensor, row_coef: torch.Tensor, target_coef: float,
                            uniform_coef: float) -> torch.Tensor:
    """PyTorch twin of `megaclass::lce_chunk_stats_grad_` (one rank holds every class)."""
    stats = chunk_stats_torch(logits, target, 0, True)
    shift = torch.log(stats[1])  # lse − max: the stored exponentials are relative to the max
    chunk_grad_torch_(logits, target, 0, shift, row_coef, target_coef, uniform_coef, True)
    return stats


@functools.cache
def extension():
    """`megaclass._C` if it was built and loads, else None (with one warning)."""
    try:
        from megaclass import _C
    except ImportError as exc:
        warnings.warn(
            f"megaclass._C is not available ({exc}); the fused op uses its PyTorch implementation "
            "(slower). Build the extension with `python setup.py build_ext --inplace`.",
            RuntimeWarning, stacklevel=3)
        return None
    return _C


@functools.cache
def _has_kernel(op: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"megaclass::{op}", key)


def uses_extension(tensor: torch.Tensor, implementation: str = "auto") -> bool:
    """Whether the kernels for `tensor` run in `megaclass._C` ("extension") or as the twin ("torch").
    "auto" picks the extension when it has a kernel for the device and dtype."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "torch":
        return False
    ok = (extension() is not None and tensor.dtype in KERNEL_DTYPES
          and _has_kernel("lce_chunk_stats", tensor.device.type))
    if implementation == "extension" and not ok:
        reason = ("megaclass._C is not built" if extension() is None else
                  f"megaclass._C has no {tensor.device.type} kernel for {tensor.dtype}")
        raise ValueError(f"implementation='extension' requested but {reason}")
    return ok


def chunk_stats(logits, target, class_start: int, store_exp: bool, use_extension: bool) -> torch.Tensor:
    if use_extension:
        return torch.ops.megaclass.lce_chunk_stats(logits, target, class_start, store_exp)
    return chunk_stats_torch(logits, target, class_start, store_exp)


def has_fused_kernel(device_type: str) -> bool:
    """Whether `megaclass._C` has `lce_chunk_stats_grad_` for the device (the CPU build has)."""
    return extension() is not None and _has_kernel("lce_chunk_stats_grad_", device_type)


def chunk_stats_grad_(logits, target, row_coef, target_coef: float, uniform_coef: float,
                      use_extension: bool) -> torch.Tensor:
    if use_extension:
        return torch.ops.megaclass.lce_chunk_stats_grad_(logits, target, row_coef, target_coef, uniform_coef)
    return chunk_stats_grad_torch_(logits, target, row_coef, target_coef, uniform_coef)


def chunk_grad_(logits, target, class_start: int, shift, row_coef, target_coef: float, uniform_coef: float,
                stored_exp: bool, use_extension: bool) -> None:
    if use_extension:
        torch.ops.megaclass.lce_chunk_grad_(logits, target, class_start, shift, row_coef,
                                            target_coef, uniform_coef, stored_exp)
    else:
        chunk_grad_torch_(logits, target, class_start, shift, row_coef, target_coef, uniform_coef, stored_exp)
