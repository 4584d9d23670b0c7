"""Dropout whose mask is a function of each sample's key rather than of a random generator's state.

With torch's generator a sample's mask depends on where it sits in the tensor that drew it: data-parallel
ranks each draw for their own slice of the global batch, so the same run on another number of ranks
drops other features. Here the keep bit of element (row r, column c) is a counter-based hash of
(seed, keys[r], c): a sample keeps its mask in any batch, on any rank and on any device.

The hash is splitmix64 (Steele, Lea & Flood 2014) used twice as a counter-based generator: row r's
state is output keys[r] + 1 of the stream seeded by `seed`, and element (r, c) is output c + 1 of the
stream seeded by that state. The top 53 bits give u in [0, 1); the element is kept when u >= p:

    gamma = 0x9E3779B97F4A7C15                            all arithmetic mod 2**64
    mix(z) = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^ (z >> 31)
    state_r = mix(seed + gamma · (keys[r] + 1))
    keep(r, c) = (mix(state_r + gamma · (c + 1)) >> 11) >= ceil(p · 2**53)

torch has no full unsigned 64-bit arithmetic, so it runs on int64, whose + and * wrap to the same bits;
its >> is arithmetic (it copies the sign bit), so every shift is masked to make it logical.
"""
from __future__ import annotations

import math

import torch

GAMMA = 0x9E3779B97F4A7C15
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _int64(value: int) -> int:
    """The signed 64-bit integer with the bits of the unsigned `value` (< 2**64)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 bits."""
    z = (z ^ _shift_right(z, 30)) * _int64(MIX1)
    z = (z ^ _shift_right(z, 27)) * _int64(MIX2)
    return z ^ _shift_right(z, 31)


def _keep_mask(keys: torch.Tensor, width: int, p: float, seed: int) -> torch.Tensor:
    """keys: [n] int64 -> [n, width] bool, True where element (r, c) is kept (module docstring)."""
    state = _mix((keys.to(torch.int64)[:, None] + 1) * _int64(GAMMA) + _int64(seed % (1 << 64)))
    columns = torch.arange(1, width + 1, dtype=torch.int64, device=keys.device) * _int64(GAMMA)
    return _shift_right(_mix(state + columns), 11) >= math.ceil(p * 2**53)


def row_seeded_dropout(x: torch.Tensor, p: float, seed: int, keys: torch.Tensor, training: bool = True) -> torch.Tensor:
    """Dropout of `x` [n, ...] with each row's mask fixed by (seed, its key): kept elements scaled by
    1 / (1 - p), the rest zero; the gradient is the same mask times 1 / (1 - p). keys: [n] int64, one per
    row, equal keys giving equal masks (the trainer's: each image's place in the run). Identity when not
    `training` or p = 0."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    if keys.shape != x.shape[:1]:
        raise ValueError(f"keys: one per row of x expected, got {tuple(keys.shape)} for x {tuple(x.shape)}")
    keep = _keep_mask(keys.to(x.device), math.prod(x.shape[1:]), p, seed).reshape(x.shape)
    return x * (keep.to(x.dtype) * (1.0 / (1.0 - p)))
