"""The op's loss options on one rank — softcap, z_loss, class_weight, return_lse — alone and together,
through both kernel implementations, against float64 references on materialized logits
(tests/lce_reference.py: `F.cross_entropy(weight=)` of c·tanh(z/c), + z_loss·logsumexp², × s)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lce_reference import assert_close_rel, make_inputs, plain
from megaclass.ops import kernels, linear_cross_entropy


def _extension_built():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kernels.extension() is not None


IMPLEMENTATIONS = ["torch", pytest.param("extension", marks=pytest.mark.skipif(
    not _extension_built(), reason="megaclass._C is not built (python setup.py build_ext --inplace)"))]
N, D, C = 37, 19, 53


def _class_weight(c, seed=1):
    return torch.rand(c, generator=torch.Generator().manual_seed(seed)) * 2  # some near 0, up to 2


OPTIONS = {
    "softcap": dict(softcap=2.5),
    "z_loss": dict(z_loss=0.05),
    "class_weight": dict(class_weight=_class_weight(C)),
    "all": dict(softcap=2.5, z_loss=0.05, class_weight=_class_weight(C)),
}


def _run(hidden, weight, target, s, bias, *, implementation, reduction, upstream, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    sw = s.clone().requires_grad_()
    loss, lse = linear_cross_entropy(h, w, target, sw, bias=b, reduction=reduction, implementation=implementation,
                                     return_lse=True, **kw)
    inputs = [t for t in (h, w, b, sw) if t is not None]
    grads = list(torch.autograd.grad(loss, inputs, upstream))
    db = grads.pop(2) if b is not None else None
    return (loss.detach(), grads[0], grads[1], db, grads[-1]), lse


def _check(dtype, implementation, reduction, options, *, eps, chunk_size, bias=True, scale=3.0, seed=3):
    # scale 3: logits of several units, so that soft-capping at 2.5 bends them and lse² matters
    hidden, weight, target, s, b = make_inputs(N, D, C, dtype, bias=bias, seed=seed, scale=scale)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
    ours, lse = _run(hidden, weight, target, s, b, implementation=implementation, reduction=reduction,
                     upstream=None if upstream is None else upstream.to(dtype), label_smoothing=eps,
                     chunk_size=chunk_size, **options)
    kw = dict(eps=eps, reduction=reduction, upstream=upstream, **options)
    ref = plain(hidden, weight, target, s, b, dtype=torch.float64, **kw)
    mine = plain(hidden, weight, target, s, b, dtype=dtype, **kw)
    for name, o, r, p in zip(("loss", "d hidden", "d weight", "d bias", "d sample_weight"), ours, ref, mine):
        if r is None:
            continue
        assert o.dtype == dtype or name == "d sample_weight", f"{name}: dtype {o.dtype}"
        assert_close_rel(name, o, r, p, dtype)
    # lse: of every row (ignored ones included), of the soft-capped logits, in fp32
    z = hidden.double() @ weight.double().t() + b.double()
    z = z if options.get("softcap") is None else options["softcap"] * torch.tanh(z / options["softcap"])
    z_plain = hidden.to(dtype) @ weight.to(dtype).t() + b.to(dtype)
    if options.get("softcap") is not None:
        z_plain = options["softcap"] * torch.tanh(z_plain / options["softcap"])
    assert lse.dtype == torch.float32 and not lse.requires_grad
    assert_close_rel("lse", lse, torch.logsumexp(z, 1), torch.logsumexp(z_plain.float(), 1), dtype)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("chunk_size", [8, None])  # several chunks with a ragged last one; one chunk
def test_options_match_float64_reference(implementation, reduction, option, chunk_size):
    _check(torch.float32, implementation, reduction, OPTIONS[option], eps=0.1, chunk_size=chunk_size)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunk_size", [8, None])  # bf16/fp16 over several chunks: gradients by class blocks
def test_all_options_in_half_precision(implementation, dtype, reduction, chunk_size):
    _check(dtype, implementation, reduction, OPTIONS["all"], eps=0.1, chunk_size=chunk_size)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_options_without_label_smoothing_and_bias(implementation):
    _check(torch.float32, implementation, "mean", OPTIONS["all"], eps=0.0, chunk_size=None, bias=True, seed=4)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_class_weight_mean_is_f_cross_entropy(eps):
    # unweighted rows: exactly F.cross_entropy(weight=, label_smoothing=) in float64 (the twin; fp64 has no
    # kernel), "mean" over Σ w_y
    hidden, weight, target, _, b = make_inputs(24, 8, 30, torch.float64, bias=True, weighted=False, seed=5)
    cw = _class_weight(30, seed=2).double()
    ours = linear_cross_entropy(hidden, weight, target, bias=b, class_weight=cw, label_smoothing=eps)
    ref = F.cross_entropy(hidden @ weight.T + b, target, weight=cw, label_smoothing=eps)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_zero_weight_of_every_target_gives_zero(implementation):
    # Σ w_y = 0 over the rows: the mean is 0 (as for a batch of ignored rows), never NaN
    hidden, weight, target, s, _ = make_inputs(10, 4, 6, seed=6, ignore_every=0)
    target.fill_(2)
    cw = torch.ones(6)
    cw[2] = 0
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, target, s, class_weight=cw, implementation=implementation)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(h.grad, torch.zeros_like(h.grad))


BAD = [
    (dict(softcap=0.0), r"softcap must be None or a finite number > 0, got 0.0"),
    (dict(softcap=float("inf")), r"softcap must be None or a finite number > 0"),
    (dict(z_loss=-1e-4), r"z_loss must be a finite number >= 0, got -0.0001"),
    (dict(z_loss=float("nan")), r"z_loss must be a finite number >= 0"),
    (dict(return_lse=1), r"return_lse must be a bool"),
    (dict(class_weight=torch.ones(9)), r"class_weight must be a tensor of shape \[10\]"),
    (dict(class_weight=torch.ones(10, dtype=torch.int64)), r"class_weight must be floating point"),
    (dict(class_weight=torch.ones(10, requires_grad=True)), r"class_weight requires grad"),
    (dict(class_weight=torch.tensor([1.0] * 3 + [-0.5] + [1.0] * 6)),
     r"class_weight must be finite and non-negative: class 3 \(local index\) holds -0.5"),
    (dict(class_weight=torch.tensor([1.0] * 7 + [float("nan")] + [1.0] * 2)), r"class 7 \(local index\) holds nan"),
    (dict(class_weight=torch.ones(10, device="meta")), r"class_weight is on meta but weight is on cpu"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_options_raise_value_error(changes, message):
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(torch.randn(6, 4), torch.randn(10, 4), torch.tensor([0, 1, 2, 9, -100, 3]), **changes)


def test_kernels_reject_stored_exponentials_with_softcap():
    logits, target = torch.zeros(3, 5), torch.zeros(3, dtype=torch.int64)
    for use_ext in [False] + ([True] if _extension_built() else []):
        with pytest.raises(ValueError, match="stored exponentials cannot be combined with softcap"):
            kernels.chunk_stats(logits, target, 0, True, use_ext, 2.0)
    if _extension_built():
        with pytest.raises(ValueError, match=r"class_weight must be a contiguous float32 \[C_local\]"):
            kernels.chunk_stats(logits, target, 0, False, True, 0.0, torch.ones(4))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_unaffected_by_nan_left_in_the_reused_logits_buffer(implementation, dtype):
    # the thread's logits buffer is reused between calls and its rows are padded (C = 53 → pitch 56): memory
    # that held NaN before must not reach the gradients (torch's CPU bf16 GEMM reads the row padding)
    from megaclass.ops import lce

    lce._logits_buffer(N, C, dtype, torch.device("cpu"))
    lce._BUFFERS.by_dtype[dtype].fill_(float("nan"))
    _check(dtype, implementation, "mean", OPTIONS["all"], eps=0.1, chunk_size=None)
