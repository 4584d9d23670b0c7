"""`megaclass.ops.linear_cross_entropy` on one rank against a float64 reference (tests/lce_reference.py),
through both kernel implementations: `megaclass._C` and the PyTorch twin."""
from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import megaclass
from lce_reference import assert_close_rel, make_inputs, plain
from megaclass.ops import kernels, lce, linear_cross_entropy


def _extension_built():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kernels.extension() is not None


IMPLEMENTATIONS = ["torch", pytest.param("extension", marks=pytest.mark.skipif(
    not _extension_built(), reason="megaclass._C is not built (python setup.py build_ext --inplace)"))]


def _ours(hidden, weight, target, s, bias, *, implementation, reduction="mean", upstream=None, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    sw = None if s is None else s.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, target, sw, bias=b, reduction=reduction, implementation=implementation, **kw)
    inputs = [t for t in (h, w, b, sw) if t is not None]
    grads = list(torch.autograd.grad(loss, inputs, upstream))
    db = grads.pop(2) if b is not None else None
    ds = grads[2] if sw is not None else None
    return loss.detach(), grads[0], grads[1], db, ds


def _check(hidden, weight, target, s, bias, implementation, *, reduction="mean", eps=0.0, ignore_index=-100, **kw):
    dtype = hidden.dtype
    upstream = torch.randn(hidden.shape[0], generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
    ours = _ours(hidden, weight, target, s, bias, implementation=implementation, reduction=reduction,
                 upstream=None if upstream is None else upstream.to(dtype), label_smoothing=eps,
                 ignore_index=ignore_index, **kw)
    ref = plain(hidden, weight, target, s, bias, dtype=torch.float64, eps=eps, reduction=reduction, upstream=upstream,
                ignore_index=ignore_index)
    mine = plain(hidden, weight, target, s, bias, dtype=dtype, eps=eps, reduction=reduction, upstream=upstream,
                 ignore_index=ignore_index)
    for name, o, r, p in zip(("loss", "d hidden", "d weight", "d bias", "d sample_weight"), ours, ref, mine):
        if r is None:
            assert o is None, name
            continue
        if name == "d sample_weight" and s is None:
            continue
        assert o.dtype == dtype or name == "d sample_weight", f"{name}: dtype {o.dtype}"
        assert_close_rel(name, o, r, p, dtype)
    return ours


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_reference(implementation, reduction, eps, bias):
    # odd shapes, several chunks with a ragged last one, ignored rows, sample weights
    hidden, weight, target, s, b = make_inputs(37, 19, 53, bias=bias, seed=3)
    _check(hidden, weight, target, s, b, implementation, reduction=reduction, eps=eps, chunk_size=8)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("chunk_size", [1, 5, 64, None])
def test_chunk_size_does_not_change_the_result(implementation, chunk_size):
    hidden, weight, target, s, b = make_inputs(29, 8, 41, bias=True, seed=4)
    _check(hidden, weight, target, s, b, implementation, eps=0.05, chunk_size=chunk_size)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision_inputs(implementation, dtype, reduction):
    hidden, weight, target, s, b = make_inputs(70, 32, 333, dtype, bias=True, seed=5)
    _check(hidden, weight, target, s, b, implementation, reduction=reduction, eps=0.1, chunk_size=16)


class _LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor any op creates (views of existing storage excluded)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(o, torch.Tensor) and o.dtype == torch.float32
                    and o.untyped_storage().data_ptr() not in inputs):
                self.largest = max(self.largest, o.numel())
        return out


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("chunk_size", [16, 64])  # several row chunks (by class), one chunk (by rows)
def test_half_precision_weight_gradient_has_no_float32_copy(implementation, chunk_size):
    # an fp32 accumulator of dW would double the gradient's memory (2.4 GB at 256,000 × 2,304)
    hidden, weight, target, s, _ = make_inputs(64, 96, 4000, torch.bfloat16, seed=12)
    spy = _LargestFloat32()
    with spy:
        ours = _ours(hidden, weight, target, s, None, implementation=implementation, chunk_size=chunk_size)
    assert ours[2].dtype == torch.bfloat16
    assert 0 < spy.largest < 4000 * 96, f"an fp32 tensor of {spy.largest} elements (dW has {4000 * 96})"
    ref = plain(hidden, weight, target, s, None, dtype=torch.float64)
    assert_close_rel("d weight", ours[2], ref[2], plain(hidden, weight, target, s, None, dtype=torch.bfloat16)[2],
                     torch.bfloat16)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_huge_logits_stay_finite(implementation):
    # logits of order 1e4: exp overflows without the max shift
    hidden, weight, target, s, _ = make_inputs(24, 16, 300, scale=1e4, seed=6)
    loss = _check(hidden, weight, target, s, None, implementation, eps=0.1, chunk_size=7)[0]
    assert loss > 1e3


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(implementation, reduction):
    hidden, weight, target, s, b = make_inputs(9, 6, 10, bias=True, seed=7)
    target.fill_(-100)
    upstream = torch.ones(9) if reduction == "none" else None
    loss, dh, dw, db, _ = _ours(hidden, weight, target, s, b, implementation=implementation, reduction=reduction,
                                upstream=upstream, label_smoothing=0.2)
    assert torch.equal(loss, torch.zeros_like(loss))  # 0, not NaN
    for g in (dh, dw, db):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_ignore_index_inside_the_class_range(implementation):
    hidden, weight, target, s, _ = make_inputs(20, 5, 12, ignore_every=0, seed=8)
    target[::3] = 4
    _check(hidden, weight, target, s, None, implementation, eps=0.1, ignore_index=4, chunk_size=6)


@pytest.mark.parametrize("bad", [True, 1.0, "4"])
def test_ignore_index_of_another_type_is_a_type_error_as_in_pytorch(bad):
    """A bool is an int to Python, but PyTorch's F.cross_entropy refuses ignore_index=True: so does the op."""
    hidden, weight, target, s, _ = make_inputs(6, 4, 5, ignore_every=0, seed=3)
    with pytest.raises(TypeError):
        torch.nn.functional.cross_entropy(hidden @ weight.T, target, ignore_index=bad)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        linear_cross_entropy(hidden, weight, target, s, ignore_index=bad)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_forward_without_grad_and_empty_batch(implementation):
    hidden, weight, target, s, b = make_inputs(15, 4, 9, bias=True, seed=9)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, target, s, bias=b, implementation=implementation)
    ref = plain(hidden, weight, target, s, b, dtype=torch.float64)[0]
    assert abs(float(loss) - float(ref)) <= 1e-5 * abs(float(ref))
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = linear_cross_entropy(empty, weight, target[:0], implementation=implementation)
    loss.backward()
    assert float(loss.detach()) == 0.0 and empty.grad.shape == (0, 4)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_gradient_work_when_grad_is_disabled(implementation, reduction, monkeypatch):
    # an eval-time loss of parameters that require grad: no gradient GEMMs, no dX all-reduce
    hidden, weight, target, s, b = make_inputs(15, 4, 9, bias=True, seed=9)
    inputs = [t.requires_grad_() for t in (hidden, weight, s, b)]
    made = []
    real = lce._Grads
    monkeypatch.setattr(lce, "_Grads", lambda *args, **kw: made.append(args[3]) or real(*args, **kw))
    ref = plain(hidden, weight, target, s, b, dtype=torch.float64, reduction=reduction)[0]
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            loss = linear_cross_entropy(hidden, weight, target, s, bias=b, reduction=reduction,
                                        implementation=implementation)
        assert not loss.requires_grad and made == [], context.__name__
        assert abs(float(loss) - float(ref)) <= 1e-5 * abs(float(ref))
    linear_cross_entropy(hidden, weight, target, s, bias=b, reduction=reduction, implementation=implementation)
    assert made == [(True, True, True)]  # with grad enabled the forward makes all three
    assert all(t.grad is None for t in inputs)


def test_unweighted_equals_cross_entropy_of_linear():
    hidden, weight, target, _, b = make_inputs(16, 8, 20, bias=True, weighted=False, seed=10)
    ours = linear_cross_entropy(hidden.double(), weight.double(), target, bias=b.double(), label_smoothing=0.3)
    ref = torch.nn.functional.cross_entropy(hidden.double() @ weight.double().T + b.double(), target,
                                            label_smoothing=0.3)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=0)


# ---- the kernels themselves, against float64 statistics of the same logits


def _stats64(z, target, start):
    z = z.double()
    m = z.amax(1)
    local = target - start
    inside = (local >= 0) & (local < z.shape[1])
    zt = torch.where(inside, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0], 0)
    return torch.stack([m, (z - m[:, None]).exp().sum(1), zt, z.sum(1)]), (z - m[:, None]).exp()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [1, 31, 100])
def test_kernels_against_float64(implementation, dtype, cols):
    gen = torch.Generator().manual_seed(cols)
    rows, start = 6, 5
    z = (torch.randn(rows, cols, generator=gen) * 4).to(dtype)
    target = torch.tensor([5, 4, 5 + cols - 1, 5 + cols, -100, 5 + cols // 2])  # in, below, last, above, ignored
    ref, e = _stats64(z, target, start)
    use_ext = implementation == "extension"
    logits = z.clone()
    stats = kernels.chunk_stats(logits, target, start, True, use_ext)
    tol = 8 * (2.0 ** -23) * cols * 4
    assert stats.dtype == torch.float32
    assert torch.allclose(stats.double(), ref, rtol=1e-5, atol=tol)
    assert torch.allclose(logits.double(), e, rtol=2 * 2.0 ** -8 if dtype == torch.bfloat16 else 1e-6, atol=1e-7)
    lse = ref[0] + ref[1].log() + 0.25  # as if other ranks held more classes
    row_coef = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.5, 0.3])
    expected = (z.double() - lse[:, None]).exp() - 0.01
    local = target - start
    for i in range(rows):
        if 0 <= local[i] < cols:
            expected[i, local[i]] -= 0.9
    expected *= row_coef.double()[:, None]
    for stored in (False, True):
        g = logits.clone() if stored else z.clone()
        shift = (lse - ref[0] if stored else lse).float()
        kernels.chunk_grad_(g, target, start, shift, row_coef, 0.9, 0.01, stored, use_ext)
        # bf16: e and g are each rounded to 8 bits; near-cancelling entries need an absolute bound
        half = dtype == torch.bfloat16
        assert torch.allclose(g.double(), expected, rtol=2.0 ** -7 if half else 1e-5,
                              atol=2.0 ** -8 * float(expected.abs().max()) if half else 1e-6)
        assert torch.equal(g[3], torch.zeros_like(g[3]))  # row_coef 0: exactly 0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [1, 31, 100])
def test_fused_stats_grad_kernel_against_float64(implementation, dtype, cols):
    """One rank holding every class: statistics and gradient (shift = the row's own lse) in one kernel."""
    gen = torch.Generator().manual_seed(100 + cols)
    rows = 5
    z = (torch.randn(rows, cols, generator=gen) * 4).to(dtype)
    target = torch.tensor([0, cols - 1, -100, cols // 2, 0])  # first, last, ignored, middle, zero weight
    row_coef = torch.tensor([1.0, 0.5, 0.0, 2.0, 0.0])
    ref, _ = _stats64(z, target, 0)
    logits = z.clone()
    stats = kernels.chunk_stats_grad_(logits, target, row_coef, 0.9, 0.01, implementation == "extension")
    assert stats.dtype == torch.float32
    assert torch.allclose(stats.double(), ref, rtol=1e-5, atol=8 * (2.0 ** -23) * cols * 4)
    expected = torch.softmax(z.double(), 1) - 0.01
    for i in range(rows):
        if target[i] >= 0:
            expected[i, target[i]] -= 0.9
    expected *= row_coef.double()[:, None]
    half = dtype == torch.bfloat16
    assert torch.allclose(logits.double(), expected, rtol=2.0 ** -7 if half else 1e-5,
                          atol=2.0 ** -8 * float(expected.abs().max()) if half else 1e-6)
    assert torch.equal(logits[2], torch.zeros_like(logits[2])) and torch.equal(logits[4], torch.zeros_like(logits[4]))


def test_fused_kernel_rejects_bad_arguments():
    if not kernels.has_fused_kernel("cpu"):
        pytest.skip("megaclass._C is not built")
    logits = torch.zeros(4, 7)
    with pytest.raises(ValueError, match="row_coef must be a contiguous float32"):
        torch.ops.megaclass.lce_chunk_stats_grad_(logits, torch.zeros(4, dtype=torch.int64), torch.zeros(3), 1.0, 0.0)
    with pytest.raises(ValueError, match="target must be a contiguous int64"):
        torch.ops.megaclass.lce_chunk_stats_grad_(logits, torch.zeros(4), torch.zeros(4), 1.0, 0.0)


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    kernels.extension.cache_clear()
    monkeypatch.setitem(sys.modules, "megaclass._C", None)  # makes `from megaclass import _C` fail
    monkeypatch.delattr(megaclass, "_C", raising=False)
    try:
        with pytest.warns(RuntimeWarning, match="megaclass._C is not available") as record:
            hidden, weight, target, s, _ = make_inputs(6, 3, 5, seed=11)
            linear_cross_entropy(hidden, weight, target, s)
            linear_cross_entropy(hidden, weight, target, s)
        assert len([w for w in record if "megaclass._C" in str(w.message)]) == 1
        assert not kernels.uses_extension(hidden)
        with pytest.raises(ValueError, match="implementation='extension'"):
            linear_cross_entropy(hidden, weight, target, implementation="extension")
    finally:
        kernels.extension.cache_clear()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_never_allocates_all_logits(implementation, reduction):
    from torch.profiler import ProfilerActivity, profile
    n, d, c, chunk = 512, 16, 4000, 32
    hidden, weight, target, s, _ = make_inputs(n, d, c, seed=12)
    hidden.requires_grad_()
    weight.requires_grad_()
    lce._BUFFERS.__dict__.clear()  # the CPU logits buffer kept between calls: allocate it afresh here
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = linear_cross_entropy(hidden, weight, target, s, reduction=reduction, chunk_size=chunk,
                                    implementation=implementation)
        loss.sum().backward()
    largest = max(e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::"))
    # one chunk of logits is 512 KB (the twin also makes a temporary of that size); all of them 8 MB
    assert largest <= chunk * c * 4, largest


# ---- weight_grad_into: dW folded into a caller's buffer (an SGD momentum buffer) instead of weight.grad


def _folded(hidden, weight, target, s, bias, into_scalars, *, implementation, reduction, upstream, **kw):
    """The op with weight's gradient folded into a copy of buffer0: (buffer, weight.grad, dX, db, ds)."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    sw = s.clone().requires_grad_()
    buffer = torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)).to(weight.dtype)
    buffer0 = buffer.clone()
    loss = linear_cross_entropy(h, w, target, sw, bias=b, reduction=reduction, implementation=implementation,
                                weight_grad_into=(buffer, *into_scalars), **kw)
    loss.backward(upstream)
    return buffer0, buffer, w.grad, h.grad, None if b is None else b.grad, sw.grad


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_into_folds_beta_buffer_plus_dw(implementation, reduction, dtype):
    # 64 rows in chunks of 16: fp32 adds 4 row chunks into the buffer, bf16 writes it by class blocks
    hidden, weight, target, s, b = make_inputs(64, 12, 90, dtype, bias=True, seed=21)
    beta = 0.9
    if reduction == "none":
        upstream, scalars = torch.rand(64, generator=torch.Generator().manual_seed(3)), (beta,)
    else:  # a loss scaled by 1/2 before backward (DeepSpeed's 1/grad_accum): alpha says so in advance
        upstream, scalars = torch.tensor(0.5), (beta, 0.5)
    buffer0, buffer, w_grad, dh, db, ds = _folded(hidden, weight, target, s, b, scalars, chunk_size=16,
                                                  implementation=implementation, reduction=reduction,
                                                  upstream=upstream.to(dtype))
    assert w_grad is None  # autograd got no weight gradient: it is in the buffer
    kw = dict(reduction=reduction, upstream=upstream if reduction == "none" else None)
    ref = plain(hidden, weight, target, s, b, dtype=torch.float64, **kw)
    mine = plain(hidden, weight, target, s, b, dtype=dtype, **kw)
    scale = 1.0 if reduction == "none" else 0.5
    expected = beta * buffer0.double() + scale * ref[2]
    plain_buffer = (beta * buffer0 + scale * mine[2]).to(dtype)
    assert buffer.dtype == dtype
    assert_close_rel("buffer", buffer, expected, plain_buffer, dtype)
    for name, o, r, p in (("d hidden", dh, ref[1], mine[1]), ("d bias", db, ref[3], mine[3]),
                          ("d sample_weight", ds, ref[4], mine[4])):
        assert_close_rel(name, o, r * scale, p * scale, dtype)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_weight_grad_into_beta_zero_ignores_the_buffer_and_empty_batches_scale_it(reduction):
    hidden, weight, target, s, _ = make_inputs(10, 4, 7, seed=22)
    ref = plain(hidden, weight, target, s, None, dtype=torch.float64, reduction=reduction,
                upstream=torch.ones(10) if reduction == "none" else None)[2]
    buffer = torch.full(weight.shape, float("nan"))
    loss = linear_cross_entropy(hidden, weight.clone().requires_grad_(), target, s, reduction=reduction,
                                weight_grad_into=(buffer, 0.0))
    loss.sum().backward()
    torch.testing.assert_close(buffer.double(), ref, rtol=1e-5, atol=1e-7)  # beta 0: NaN never read
    # no rows: dW = 0, so the buffer becomes beta·buffer
    buffer0 = torch.randn(weight.shape)
    buffer = buffer0.clone()
    empty = torch.zeros(0, 4, requires_grad=True)
    linear_cross_entropy(empty, weight.clone().requires_grad_(), target[:0], reduction=reduction,
                         weight_grad_into=(buffer, 0.25)).sum().backward()
    assert torch.equal(buffer, buffer0 * 0.25)


def test_weight_grad_into_writes_nothing_without_gradients_and_checks_the_upstream_gradient():
    hidden, weight, target, s, _ = make_inputs(10, 4, 7, seed=23)
    w = weight.clone().requires_grad_()
    buffer0 = torch.randn(weight.shape)
    buffer = buffer0.clone()
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            linear_cross_entropy(hidden, w, target, s, weight_grad_into=(buffer, 0.9))
        assert torch.equal(buffer, buffer0), context.__name__
    linear_cross_entropy(hidden, weight, target, s, weight_grad_into=(buffer, 0.9))  # weight needs no grad
    assert torch.equal(buffer, buffer0)
    # dW of "mean" is folded in forward for the upstream gradient alpha (1 here): a loss scaled by 1/2
    # afterwards would leave a gradient twice too large in the buffer, so backward refuses it
    loss = linear_cross_entropy(hidden, w, target, s, weight_grad_into=(buffer, 0.9))
    with pytest.raises(RuntimeError, match=r"upstream gradient 0.5, but weight_grad_into folded .* for 1.0"):
        (loss / 2).backward()


def test_weight_grad_into_bad_arguments_name_it():
    hidden, weight, target, s, _ = make_inputs(10, 4, 7, seed=24)
    w = weight.clone().requires_grad_()
    good = torch.zeros(7, 4)
    cases = [((torch.zeros(7, 5), 0.9), r"buffer must be a tensor of weight's shape \[7, 4\]"),
             ((good.double(), 0.9), r"buffer must match weight's dtype and device"),
             ((torch.zeros(4, 7).t(), 0.9), r"buffer must be contiguous"),
             ((torch.zeros(7, 4, requires_grad=True), 0.9), r"must not require grad"),
             ((good, float("nan")), r"beta must be a finite number, got nan"),
             ((good, 0.9, "1"), r"alpha must be a finite number"),
             ((good,), r"must be None or \(buffer, beta\) or \(buffer, beta, alpha\)"),
             (good, r"must be None or \(buffer, beta\)")]
    for into, message in cases:
        with pytest.raises(ValueError, match="weight_grad_into"):
            linear_cross_entropy(hidden, w, target, s, weight_grad_into=into)
        with pytest.raises(ValueError, match=message):
            linear_cross_entropy(hidden, w, target, s, weight_grad_into=into)
    with pytest.raises(ValueError, match=r"weight_grad_into: alpha must be 1 for reduction='none'"):
        linear_cross_entropy(hidden, w, target, s, reduction="none", weight_grad_into=(good, 0.9, 0.5))
    assert torch.equal(good, torch.zeros(7, 4))
