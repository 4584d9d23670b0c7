"""The matrix products the fused op runs, seen by a TorchDispatchMode as ATen receives them: their FLOPs
(three GEMM-equivalents for "mean"/"sum" in every dtype while the rows span ≤ MAX_ROW_CHUNKS chunks; the
class sweep's fourth only beyond) and their alignment (every pitch and block start a multiple of 16
bytes, also for an odd C_local), with the result checked against the float64 reference each time."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lce_reference import assert_close_rel, make_inputs, plain
from megaclass.ops import lce, linear_cross_entropy
from test_ops_lce import IMPLEMENTATIONS

aten = torch.ops.aten
# (m, k, n) of the product each op computes, from its matrix arguments
_PRODUCTS = {aten.mm: (0, 1), aten.addmm: (1, 2), aten.addmm_: (1, 2), aten.bmm: (0, 1), aten.baddbmm: (1, 2),
             aten.mv: (0, 1), aten.addmv: (1, 2), aten.matmul: (0, 1)}


class _Matmuls(TorchDispatchMode):
    """FLOPs of every matrix product ATen runs, and each of its 2-D operands (output included) as
    (data_ptr, strides, element size)."""

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.operands = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _PRODUCTS:
            i, j = _PRODUCTS[packet]
            a, b = args[i], args[j]
            m, k = a.shape[-2:] if a.dim() > 1 else (1, a.shape[0])
            n = b.shape[-1] if b.dim() > 1 else 1
            batch = a.shape[0] if a.dim() == 3 else 1
            self.flops += 2 * batch * m * k * n
            for t in [*args, *kwargs.values()]:
                if isinstance(t, torch.Tensor) and t.dim() == 2:
                    self.operands.append((func, t.data_ptr(), t.stride(), t.element_size(), tuple(t.shape)))
        return func(*args, **kwargs)


def _run(hidden, weight, target, s, bias, implementation, reduction, chunk_size):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    spy = _Matmuls()
    with spy:
        loss = linear_cross_entropy(h, w, target, s, bias=b, reduction=reduction, chunk_size=chunk_size,
                                    implementation=implementation)
        loss.backward()
    ref = plain(hidden, weight, target, s, bias, dtype=torch.float64, reduction=reduction)
    same = plain(hidden, weight, target, s, bias, dtype=hidden.dtype, reduction=reduction)
    for name, ours, r, p in zip(("loss", "d hidden", "d weight"), (loss.detach(), h.grad, w.grad), ref, same):
        assert_close_rel(name, ours, r, p, hidden.dtype)
    return spy


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_three_gemms_up_to_four_row_chunks(implementation, reduction, dtype):
    n, d, c = 256, 32, 1000
    hidden, weight, target, s, _ = make_inputs(n, d, c, dtype, seed=31)
    one_gemm = 2 * n * d * c
    for chunk_size in (None, n // 4):  # one chunk, four chunks
        spy = _run(hidden, weight, target, s, None, implementation, reduction, chunk_size)
        if dtype == torch.float16:  # + the gradient scale's bound, a matrix-vector product (2·N·D)
            assert spy.flops == 3 * one_gemm + 2 * n * d, (chunk_size, spy.flops / one_gemm)
        else:
            assert spy.flops == 3 * one_gemm, (chunk_size, spy.flops / one_gemm)
    if dtype != torch.float32:  # beyond four row chunks, bf16/fp16 gradients come by class blocks: a fourth
        spy = _run(hidden, weight, target, s, None, implementation, reduction, n // 8)
        assert spy.flops - 4 * one_gemm in (0, 2 * n * d), spy.flops / one_gemm


def _misaligned(spy):
    bad = []
    for func, ptr, strides, size, shape in spy.operands:
        pitch = max(strides) if min(shape) > 1 else 0  # the leading dimension (either layout)
        if ptr % 16 or (pitch * size) % 16:
            bad.append((str(func), ptr % 16, strides, shape))
    return bad


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype,chunk_size,reduction", [
    (torch.float32, 24, "mean"),   # row chunks with a ragged last one
    (torch.bfloat16, 32, "mean"),  # four row chunks
    (torch.bfloat16, 8, "sum"),    # class blocks (a narrower last one)
    (torch.float32, 16, "none"),   # recomputed in backward
])
def test_every_gemm_operand_is_16_byte_aligned_for_an_odd_shard(implementation, dtype, chunk_size, reduction):
    # 1,001 classes: a logits row of 4,004 (fp32) or 2,002 (bf16) bytes unless the buffer's pitch is padded
    hidden, weight, target, s, bias = make_inputs(128, 32, 1001, dtype, bias=True, seed=32)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    spy = _Matmuls()
    with spy:
        loss = linear_cross_entropy(h, w, target, s, bias=b, reduction=reduction, chunk_size=chunk_size,
                                    implementation=implementation)
        loss.sum().backward()
    assert spy.operands, "no matrix product seen"
    assert not _misaligned(spy), _misaligned(spy)[:4]
    ref = plain(hidden, weight, target, s, bias, dtype=torch.float64, reduction=reduction,
                upstream=torch.ones(128) if reduction == "none" else None)
    same = plain(hidden, weight, target, s, bias, dtype=dtype, reduction=reduction,
                 upstream=torch.ones(128) if reduction == "none" else None)
    for name, ours, r, p in zip(("d hidden", "d weight", "d bias"), (h.grad, w.grad, b.grad), ref[1:], same[1:]):
        assert_close_rel(name, ours, r, p, dtype)


def test_class_blocks_start_at_multiples_of_128_classes():
    d = 16
    hidden, weight, target, s, _ = make_inputs(64, d, 1001, torch.bfloat16, seed=33)
    w = weight.clone().requires_grad_()
    spy = _Matmuls()
    with spy:
        linear_cross_entropy(hidden, w, target, s, chunk_size=8).backward()  # 8 row chunks: by class blocks
    row_bytes = d * w.element_size()
    starts = sorted({(ptr - w.data_ptr()) // row_bytes for _, ptr, _, _, _ in spy.operands
                     if 0 <= ptr - w.data_ptr() < w.nbytes})
    assert len(starts) > 1 and all(c0 % lce.CLASS_BLOCK == 0 for c0 in starts), starts
