"""`megaclass.ops.linear_cross_entropy` on a CUDA device: the CPU tests' checks (tests/lce_reference.py:
float64 `F.cross_entropy` on materialized logits; an error at most twice plain PyTorch's own in the same
dtype) for fp32, bf16 and fp16, through the CUDA kernels and the PyTorch twin; plus what is specific to
the GPU: no host synchronisation inside the chunk loop, devices named in errors, NCCL tensor parallelism.
All tests skip without a GPU; the NCCL test needs two.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from dist_utils import run_ranks
from lce_reference import assert_close_rel, make_inputs, plain
from megaclass.ops import linear_cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMPLEMENTATIONS = ["extension", "torch"]
NAMES = ("loss", "d hidden", "d weight", "d bias", "d sample_weight")


def _inputs(n, d, c, dtype, device="cuda", **kw):
    return tuple(None if t is None else t.to(device) for t in make_inputs(n, d, c, dtype, **kw))


def _ours(hidden, weight, target, s, bias, upstream, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    sw = None if s is None else s.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, target, sw, bias=b, **kw)
    assert loss.device == hidden.device
    inputs = [t for t in (h, w, b, sw) if t is not None]
    grads = list(torch.autograd.grad(loss, inputs, None if upstream is None else upstream.to(loss.dtype)))
    db = grads.pop(2) if b is not None else None
    return loss.detach(), grads[0], grads[1], db, grads[2] if sw is not None else None


def _check(hidden, weight, target, s, bias, *, eps=0.0, reduction="mean", options=None, **kw):
    dtype = hidden.dtype
    options = options or {}
    upstream = (torch.randn(hidden.shape[0], generator=torch.Generator().manual_seed(1)).to(hidden.device)
                if reduction == "none" else None)
    ours = _ours(hidden, weight, target, s, bias, upstream, label_smoothing=eps, reduction=reduction, **options, **kw)
    ref = plain(hidden, weight, target, s, bias, dtype=torch.float64, eps=eps, reduction=reduction, upstream=upstream,
                **options)
    mine = plain(hidden, weight, target, s, bias, dtype=dtype, eps=eps, reduction=reduction, upstream=upstream,
                 **options)
    for name, o, r, p in zip(NAMES, ours, ref, mine):
        if r is None or (name == "d sample_weight" and s is None):
            continue
        assert o.device == hidden.device and (o.dtype == dtype or name == "d sample_weight"), name
        assert_close_rel(name, o, r, p, dtype)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_reference(dtype, reduction, implementation):
    _check(*_inputs(67, 48, 1003, dtype, bias=True), eps=0.1, reduction=reduction, chunk_size=16,
           implementation=implementation)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_options_match_float64_reference(dtype, reduction, implementation):
    cw = (torch.rand(1003, generator=torch.Generator().manual_seed(3)) * 2).cuda()
    options = dict(softcap=2.5, z_loss=0.05, class_weight=cw)
    _check(*_inputs(67, 48, 1003, dtype, bias=True, scale=3.0), eps=0.1, reduction=reduction, chunk_size=16,
           implementation=implementation, options=options)


@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_shapes_many_chunks_no_weights(dtype):
    _check(*_inputs(301, 33, 20_011, dtype, weighted=False, ignore_every=0), chunk_size=37)


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_chunking_large_vocabulary(dtype):
    _check(*_inputs(512, 64, 256_000, dtype), eps=0.05)


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_logits_stay_finite(dtype):
    # logits of order 1e3 (1e2 in fp16, whose range ends at 65504): exp without the max shift overflows
    scale = 300.0 if dtype == torch.float16 else 3000.0
    _check(*_inputs(40, 32, 999, dtype, scale=scale), reduction="sum", chunk_size=8)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(reduction):
    hidden, weight, target, s, _ = _inputs(9, 16, 50, torch.bfloat16)
    target.fill_(-100)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, target, s, reduction=reduction)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    loss.sum().backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_memory_beyond_inputs_and_gradients_is_one_working_set(reduction):
    """Several row chunks of a bf16 weight: the gradients come by class blocks, so beyond the inputs and
    the gradients the op holds one working set (chunk rows × C_local) and fp32 dX buffers, never an
    fp32 copy of dW (here 2× the working set)."""
    n, d, c, chunk = 1024, 256, 64_000, 128
    hidden, weight, target, s, _ = _inputs(n, d, c, torch.bfloat16)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = linear_cross_entropy(h, w, target, s, reduction=reduction, chunk_size=chunk)
    loss.backward(torch.ones_like(loss))
    torch.cuda.synchronize()
    beyond = torch.cuda.max_memory_allocated() - base - (h.grad.nbytes + w.grad.nbytes)
    working_set, dx32 = chunk * c * 2, n * d * 4
    assert w.grad.dtype == torch.bfloat16
    assert beyond <= working_set + 2 * dx32 + (2 << 20), (beyond, working_set, dx32)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_host_synchronisation_in_the_chunk_loop(implementation):
    """Per-call validation may synchronise a fixed number of times; the chunk loop never does: one
    chunk and 16 chunks must show the same number of synchronising calls."""
    hidden, weight, target, s, bias = _inputs(512, 64, 5000, torch.bfloat16, bias=True)

    def syncs(run):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(c.message) for c in caught)

    def step(chunk_size, reduction):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        loss = linear_cross_entropy(h, w, target, s, bias=b, reduction=reduction, chunk_size=chunk_size,
                                    implementation=implementation)
        loss.backward(torch.ones_like(loss))

    assert syncs(lambda: torch.ones(1, device="cuda").item()) >= 1, "the sync detector itself works"
    for reduction in ("mean", "none"):
        assert syncs(lambda: step(512, reduction)) == syncs(lambda: step(32, reduction)), reduction


def test_mixed_devices_name_the_arguments():
    hidden, weight, target, s, bias = _inputs(8, 16, 30, torch.float32, bias=True)
    for kwargs, culprit in ((dict(weight=weight.cpu()), "weight"), (dict(target=target.cpu()), "target"),
                            (dict(sample_weight=s.cpu()), "sample_weight"), (dict(bias=bias.cpu()), "bias")):
        args = dict(hidden=hidden, weight=weight, target=target, sample_weight=s, bias=bias) | kwargs
        with pytest.raises(ValueError, match=culprit):
            linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("target"), args.pop("sample_weight"),
                                 **args)


def test_bad_target_on_cuda_names_row():
    hidden, weight, target, s, _ = _inputs(8, 16, 30, torch.float32)
    target[5] = 30
    with pytest.raises(ValueError, match=r"target\[5\] = 30"):
        linear_cross_entropy(hidden, weight, target, s)


def _tensor_parallel_rank(rank, world, n, d, c):
    """Rank `rank` of an NCCL group holds an uneven shard of the classes on cuda:rank."""
    hidden, weight, target, s, bias = _inputs(n, d, c, torch.bfloat16, bias=True, device=f"cuda:{rank}")
    sizes = [c // world + (r < c % world) + (5 if r == 0 else -5 if r == 1 else 0) for r in range(world)]
    start = sum(sizes[:rank])
    shard = slice(start, start + sizes[rank])
    ours = _ours(hidden, weight[shard], target, s, bias[shard], None, class_start=start, label_smoothing=0.1,
                 chunk_size=24, process_group=torch.distributed.group.WORLD)
    return [None if t is None else t.cpu() for t in ours], start


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (NCCL ranks need a GPU each)")
def test_tensor_parallel_over_nccl_matches_one_rank():
    n, d, c = 100, 32, 2001
    results = run_ranks(_tensor_parallel_rank, 2, n, d, c, backend="nccl")
    inputs = make_inputs(n, d, c, torch.bfloat16, bias=True)
    ref = plain(*inputs, dtype=torch.float64, eps=0.1)
    mine = plain(*inputs, dtype=torch.bfloat16, eps=0.1)
    for ours, start in results:
        shard = slice(start, start + ours[2].shape[0])
        for i, name in enumerate(NAMES):
            r, p = ref[i], mine[i]
            if name in ("d weight", "d bias"):
                r, p = r[shard], p[shard]
            assert_close_rel(name, ours[i], r, p, torch.bfloat16)
