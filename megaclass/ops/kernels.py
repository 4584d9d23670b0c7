"""The three per-chunk kernels of the fused op, and the choice between `megaclass._C` and their twin.

Contract (the header of `csrc/megaclass_ops.cpp` is the authority; z' = softcap·tanh(z/softcap) when
softcap > 0, else z; w = class_weight, or 1):

  chunk_stats(logits, target, class_start, store_exp, softcap=0, class_weight=None) -> stats
      logits: [R, C_local] row-major (its row pitch may exceed C_local), this rank's classes [class_start, class_start + C_local)
      target: [R] int64 global class ids (a target outside the shard contributes target logit 0)
      stats:  [4, R] fp32 (fp64 for fp64 logits): max_c z', Σ_c exp(z' − max), z'_target, Σ_c w_c·z'_c
      store_exp (softcap 0 only): logits are overwritten with exp(z − max), so that the gradient pass
      needs no exp of its own (one exp per element in all).

  chunk_grad_(logits, target, class_start, shift, row_coef, target_coef, uniform_coef, stored_exp,
              softcap=0, class_weight=None, p_coef=None)
      in place: g[i, c] = (pc[i]·p[i, c] − k[i]·w_c·(target_coef·[c == target[i] − class_start] + uniform_coef))
                          · (1 − (z'[i, c]/softcap)²  if softcap)
      with k = row_coef, pc = p_coef (None: k), p = exp(z' − shift) (shift = lse), or p = e · exp(−shift)
      when stored_exp (shift = lse − max).

  chunk_stats_grad_(logits, target, row_coef, target_coef, uniform_coef, softcap=0, class_weight=None,
                    lse_coef=0) -> stats
      both, for a group of one rank (logits hold every class): the stats of chunk_stats, and logits
      turned into chunk_grad_'s gradient with shift = lse and pc = k·(target_coef·w_target +
      uniform_coef·Σ_c w_c + lse_coef·lse) (pc = k without class weights and lse_coef), each row in one
      visit (CPU kernel only).

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


def _capped(z: torch.Tensor, softcap: float) -> torch.Tensor:
    return torch.tanh(z / softcap).mul_(softcap) if softcap else z


def _check_options(stored_exp: bool, softcap: float) -> None:
    if stored_exp and softcap:
        raise ValueError("stored exponentials cannot be combined with softcap (the gradient needs the capped logits)")


def chunk_stats_torch(logits: torch.Tensor, target: torch.Tensor, class_start: int, store_exp: bool,
                      softcap: float = 0.0, class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch twin of `megaclass::lce_chunk_stats`; logits: [R, C_local] -> stats [4, R]."""
    _check_options(store_exp, softcap)
    rows, c_local = logits.shape
    acc = stats_dtype(logits.dtype)
    out = torch.zeros(4, rows, dtype=acc, device=logits.device)
    if c_local == 0:
        out[0].fill_(float("-inf"))
        return out
    local, inside = _local_target(target, class_start, c_local)
    z = _capped(logits.to(acc), softcap)
    out[3] = z.sum(1) if class_weight is None else z @ class_weight.to(acc)
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
                      row_coef: torch.Tensor, target_coef: float, uniform_coef: float, stored_exp: bool,
                      softcap: float = 0.0, class_weight: torch.Tensor | None = None,
                      p_coef: torch.Tensor | None = None) -> None:
    """PyTorch twin of `megaclass::lce_chunk_grad_`: logits [R, C_local] become d loss / d logits in place."""
    _check_options(stored_exp, softcap)
    rows, c_local = logits.shape
    if rows == 0 or c_local == 0:
        return
    acc = stats_dtype(logits.dtype)
    p = logits if logits.dtype == acc else logits.to(acc)
    chain = None
    if softcap:
        t = torch.tanh(p / softcap)
        p = (t * softcap).sub_(shift[:, None]).exp_()
        chain = t.square_().neg_().add_(1)
    elif stored_exp:
        p = p.mul_(torch.exp(-shift)[:, None]) if p is logits else p.mul(torch.exp(-shift)[:, None])
    else:
        p = p.sub_(shift[:, None]).exp_() if p is logits else (p - shift[:, None]).exp_()
    p.mul_((row_coef if p_coef is None else p_coef)[:, None])
    local, inside = _local_target(target, class_start, c_local)
    k_target = inside.to(acc) * row_coef * -target_coef
    if class_weight is None:
        if uniform_coef:
            p.sub_(row_coef[:, None] * uniform_coef)
    else:
        w = class_weight.to(acc)
        if uniform_coef:
            p.sub_(row_coef[:, None] * (uniform_coef * w))
        k_target = k_target * w.gather(0, local)
    # a scatter rather than indexing with nonzero(): no host synchronisation on CUDA
    p.scatter_add_(1, local[:, None], k_target[:, None])
    if chain is not None:
        p.mul_(chain)
    if p is not logits:
        logits.copy_(p)


def chunk_stats_grad_torch_(logits: torch.Tensor, target: torch.Tensor, row_coef: torch.Tensor, target_coef: float,
                            uniform_coef: float, softcap: float = 0.0, class_weight: torch.Tensor | None = None,
                            lse_coef: float = 0.0) -> torch.Tensor:
    """PyTorch twin of `megaclass::lce_chunk_stats_grad_` (one rank holds every class)."""
    stats = chunk_stats_torch(logits, target, 0, not softcap, softcap, class_weight)
    log_sumexp = torch.log(stats[1])
    p_coef = None
    if class_weight is not None or lse_coef:
        c_local = logits.shape[1]
        if class_weight is None:
            w_target, total = torch.ones_like(log_sumexp), float(c_local)
        else:
            local, inside = _local_target(target, 0, c_local)
            w = class_weight.to(log_sumexp.dtype)
            w_target, total = torch.where(inside, w.gather(0, local), 0), w.sum()
        p_coef = row_coef * (target_coef * w_target + uniform_coef * total + lse_coef * (stats[0] + log_sumexp))
    if softcap:  # the logits still hold the raw z: the gradient caps them again, shift = lse
        chunk_grad_torch_(logits, target, 0, stats[0] + log_sumexp, row_coef, target_coef, uniform_coef, False,
                          softcap, class_weight, p_coef)
    else:  # the stored exponentials are relative to the max: shift = lse − max
        chunk_grad_torch_(logits, target, 0, log_sumexp, row_coef, target_coef, uniform_coef, True, 0.0,
                          class_weight, p_coef)
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
    _register_fakes()
    return _C


@functools.cache
def _register_fakes():
    """Fake (meta) implementations of the extension's ops: their output shapes, for torch.compile and
    torch.library.opcheck. The in-place logits need none (the schema's Tensor(a!) says it)."""

    def stats(logits, target, *args):
        return logits.new_empty((4, logits.shape[0]), dtype=torch.float32)

    torch.library.register_fake("megaclass::lce_chunk_stats", stats)
    torch.library.register_fake("megaclass::lce_chunk_stats_grad_", stats)
    torch.library.register_fake("megaclass::lce_chunk_grad_", lambda *args: None)


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


def chunk_stats(logits, target, class_start: int, store_exp: bool, use_extension: bool, softcap: float = 0.0,
                class_weight=None) -> torch.Tensor:
    if use_extension:
        return torch.ops.megaclass.lce_chunk_stats(logits, target, class_start, store_exp, softcap, class_weight)
    return chunk_stats_torch(logits, target, class_start, store_exp, softcap, class_weight)


def has_fused_kernel(device_type: str) -> bool:
    """Whether `megaclass._C` has `lce_chunk_stats_grad_` for the device (the CPU build has)."""
    return extension() is not None and _has_kernel("lce_chunk_stats_grad_", device_type)


def chunk_stats_grad_(logits, target, row_coef, target_coef: float, uniform_coef: float, use_extension: bool,
                      softcap: float = 0.0, class_weight=None, lse_coef: float = 0.0) -> torch.Tensor:
    if use_extension:
        return torch.ops.megaclass.lce_chunk_stats_grad_(logits, target, row_coef, target_coef, uniform_coef,
                                                         softcap, class_weight, lse_coef)
    return chunk_stats_grad_torch_(logits, target, row_coef, target_coef, uniform_coef, softcap, class_weight,
                                   lse_coef)


def chunk_grad_(logits, target, class_start: int, shift, row_coef, target_coef: float, uniform_coef: float,
                stored_exp: bool, use_extension: bool, softcap: float = 0.0, class_weight=None,
                p_coef=None) -> None:
    if use_extension:
        torch.ops.megaclass.lce_chunk_grad_(logits, target, class_start, shift, row_coef, target_coef,
                                            uniform_coef, stored_exp, softcap, class_weight, p_coef)
    else:
        chunk_grad_torch_(logits, target, class_start, shift, row_coef, target_coef, uniform_coef, stored_exp,
                          softcap, class_weight, p_coef)
