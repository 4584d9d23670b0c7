"""fp16/bf16 gradients under loss scaling, as torch.amp.GradScaler drives them: the loss times 8,192, then
backward. Every gradient's error against float64 (at the same scale) must be at most 2× plain PyTorch's in
the same dtype (flash-attention's rule; tests/lce_reference.py), on the whole tensor and on dW's rows of
classes that are no row's target: those hold only k·p ≈ 1/(N·C) terms, which flush to zero in fp16 when
the gradient is made before the loss scale is known."""
from __future__ import annotations

import functools

import pytest
import torch

from lce_reference import assert_close_rel, make_inputs, plain
from megaclass.ops import linear_cross_entropy
from test_ops_lce import IMPLEMENTATIONS

N, D, C, LOSS_SCALE = 256, 32, 8192, 8192.0
S_SCALE = 1 / 64
"""Sample weights in [0, 2/64): k·p ≈ s/(N·C) as at a 64× larger N·C (1.3·10^8, e.g. 1,024 × 131,072), where
it is below fp16's smallest subnormal, at the cost of this small shape."""


@functools.cache
def _references(dtype, reduction):
    hidden, weight, target, s, bias = make_inputs(N, D, C, dtype, bias=True, seed=51)
    s = s * S_SCALE
    upstream = torch.tensor(LOSS_SCALE)
    ref = plain(hidden, weight, target, s, bias, dtype=torch.float64, reduction=reduction, upstream=upstream)
    same = plain(hidden, weight, target, s, bias, dtype=dtype, reduction=reduction, upstream=upstream)
    return (hidden, weight, target, s, bias), ref, same


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction,chunk_size", [  # one chunk, four (rows), eight (by class blocks)
    ("mean", None), ("mean", N // 4), ("mean", N // 8), ("sum", None)])
def test_gradients_under_a_loss_scale_of_8192(implementation, dtype, reduction, chunk_size):
    (hidden, weight, target, s, bias), ref, same = _references(dtype, reduction)
    h, w, b, sw = (t.clone().requires_grad_() for t in (hidden, weight, bias, s))
    loss = linear_cross_entropy(h, w, target, sw, bias=b, reduction=reduction, chunk_size=chunk_size,
                                implementation=implementation)
    (loss * LOSS_SCALE).backward()
    for name, ours, r, p in zip(("d hidden", "d weight", "d bias", "d sample_weight"),
                                (h.grad, w.grad, b.grad, sw.grad), ref[1:], same[1:]):
        assert ours.dtype == (torch.float32 if name == "d sample_weight" else dtype), name
        assert_close_rel(name, ours, r, p, dtype)
    untargeted = torch.ones(C, dtype=torch.bool)
    untargeted[target[target >= 0]] = False
    assert_close_rel("d weight of untargeted classes", w.grad[untargeted], ref[2][untargeted], same[2][untargeted],
                     dtype)
    assert (w.grad[untargeted] != 0).float().mean() > 0.99  # not flushed to zero


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fp16_weight_grad_into_takes_the_loss_scale_as_alpha(implementation):
    # dW folded in forward at alpha = the loss scale: made at that scale, as plain PyTorch makes it
    (hidden, weight, target, s, bias), ref, same = _references(torch.float16, "mean")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    buffer = torch.empty_like(weight)
    loss = linear_cross_entropy(h, w, target, s, bias=bias, implementation=implementation,
                                weight_grad_into=(buffer, 0.0, LOSS_SCALE))
    (loss * LOSS_SCALE).backward()
    assert w.grad is None
    assert_close_rel("folded d weight", buffer, ref[2], same[2], torch.float16)
    assert_close_rel("d hidden", h.grad, ref[1], same[1], torch.float16)
