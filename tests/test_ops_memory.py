"""What the fused op keeps alive on CPU: after backward, nothing of weight's size beyond weight and its
gradient (an upstream gradient other than 1 scales the gradients in place); the peak of a step stays
within inputs + gradients + one working set; and a fresh weight.grad each step reuses a released
gradient's storage without ever overwriting a gradient someone still holds."""
from __future__ import annotations

import ctypes
import gc
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lce_reference import assert_close_rel, make_inputs, plain
from megaclass.ops import lce, linear_cross_entropy
from test_ops_lce import IMPLEMENTATIONS


def _is_tensor(obj):
    try:
        return isinstance(obj, torch.Tensor)
    except Exception:
        return False


def _storages_of(numel):
    """data_ptrs of the storages of every live tensor with `numel` elements."""
    gc.collect()
    found = set()
    with warnings.catch_warnings():  # isinstance on some torch.distributed aliases warns
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        tensors = [obj for obj in objects if _is_tensor(obj)]
    for obj in tensors:
        try:
            if obj.numel() == numel:
                found.add(obj.untyped_storage().data_ptr())
        except Exception:  # objects that refuse isinstance or have no storage
            continue
    return found


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_keeps_no_copy_of_the_gradients(implementation, reduction, dtype):
    # 333 × 24 weight: no other tensor of the step has its 7,992 elements
    hidden, weight, target, s, bias = make_inputs(40, 24, 333, dtype, bias=True, seed=41)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    loss = linear_cross_entropy(h, w, target, s, bias=b, reduction=reduction, chunk_size=16,
                                implementation=implementation)
    (3 * loss).sum().backward()  # loss stays alive, and with it the graph and its ctx
    expected = {t.untyped_storage().data_ptr() for t in (weight, w, w.grad)}  # the input, its copy, the gradient
    assert _storages_of(w.numel()) == expected
    upstream = torch.full((40,), 3.0) if reduction == "none" else torch.tensor(3.0)
    ref = plain(hidden, weight, target, s, bias, dtype=torch.float64, reduction=reduction, upstream=upstream)
    same = plain(hidden, weight, target, s, bias, dtype=dtype, reduction=reduction, upstream=upstream)
    for name, ours, r, p in zip(("d hidden", "d weight", "d bias"), (h.grad, w.grad, b.grad), ref[1:], same[1:]):
        assert_close_rel(name, ours, r, p, dtype)
    with pytest.raises(RuntimeError, match="second backward|backward through the graph a second time"):
        loss.sum().backward()


class _mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use():
    """Bytes malloc has handed out and not had back (heap arenas + mmapped chunks), from glibc."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.mallinfo2.restype = _mallinfo2
except (OSError, AttributeError):
    _LIBC = None


class _PeakHeap(TorchDispatchMode):
    """The largest heap in use seen after any ATen op (a step's peak is right after an allocation)."""

    def __init__(self):
        super().__init__()
        self.peak = _heap_in_use()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _heap_in_use())
        return out


@pytest.mark.skipif(_LIBC is None, reason="needs glibc's mallinfo2")
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_peak_memory_of_a_step_is_inputs_gradients_and_one_working_set(implementation, reduction):
    n, d, c, chunk = 256, 64, 8000, 64
    hidden, weight, target, s, _ = make_inputs(n, d, c, seed=42)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    # a first step initializes what stays (thread pools, the BLAS's own buffers); then the logits buffer
    # and the gradient pool are dropped, so that the measured step allocates them again
    with _PeakHeap():  # (a dispatch mode's first use, too)
        linear_cross_entropy(h, w, target, s, reduction=reduction, chunk_size=chunk,
                             implementation=implementation).sum().backward()
    h.grad = w.grad = None
    lce._BUFFERS.__dict__.clear()
    gc.collect()
    base = _heap_in_use()
    spy = _PeakHeap()
    with spy:
        loss = linear_cross_entropy(h, w, target, s, reduction=reduction, chunk_size=chunk,
                                    implementation=implementation)
        (3 * loss).sum().backward()
    working_set, gradients = chunk * c * 4, w.grad.nbytes + h.grad.nbytes
    small = 256 << 10  # per-row vectors ([N] statistics, weights, targets), Python objects
    assert spy.peak - base <= gradients + working_set + small, (spy.peak - base, gradients, working_set)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_fresh_weight_grad_reuses_a_released_storage_and_never_one_still_held(implementation):
    hidden, weight, target, s, _ = make_inputs(64, 64, 5000, seed=43)  # dW: 1.28 MB, pooled
    w = weight.clone().requires_grad_()
    ref = plain(hidden, weight, target, s, None, dtype=torch.float64)[2]
    same = plain(hidden, weight, target, s, None, dtype=torch.float32)[2]

    def step():
        linear_cross_entropy(hidden, w, target, s, implementation=implementation).backward()
        assert_close_rel("d weight", w.grad, ref, same, torch.float32)
        return w.grad.data_ptr()

    first = step()
    w.grad = None  # as optimizer.zero_grad() leaves it
    assert step() == first  # the released storage is reused: no fresh pages to fault in
    held = w.grad
    kept = held.clone()
    w.grad = None
    assert step() != first  # someone still holds the previous gradient: it must stay as it was
    assert torch.equal(held, kept)
    w.grad = None
    lce.linear_cross_entropy(hidden, w, target, s, implementation=implementation).backward()
    assert torch.equal(held, kept)
