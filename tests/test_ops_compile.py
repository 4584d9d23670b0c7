"""The op under torch.compile and as torch.library ops: `torch.compile(fullgraph=True)` of a function calling
`linear_cross_entropy` (fullgraph: any graph break is an error) gives eager's loss and gradients, and the
float64 reference's within the usual tolerance; `torch.library.opcheck` (PyTorch's own custom-op test
suite) passes for every op megaclass registers; the ranks' agreement runs once per kind of call; no host
synchronisation on a GPU."""
from __future__ import annotations

import warnings

import pytest
import torch

from dist_utils import run_ranks
from lce_reference import assert_close_rel, make_inputs, plain
from megaclass.ops import kernels, lce, linear_cross_entropy
from megaclass.parallel import comm

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    EXTENSION = kernels.extension() is not None
needs_extension = pytest.mark.skipif(not EXTENSION, reason="megaclass._C is not built")
OPTIONS = dict(label_smoothing=0.1, softcap=3.0, z_loss=0.01, chunk_size=8)


def _loss_fn(reduction, group=None, **options):
    def fn(hidden, weight, bias, s, target):
        loss = linear_cross_entropy(hidden, weight, target, s, bias=bias, reduction=reduction, process_group=group,
                                    **options)
        return loss * 2.0 if reduction != "none" else (loss * torch.linspace(0.5, 1.5, loss.shape[0])).sum()
    return fn


def _grads(fn, inputs, target):
    leaves = [t.clone().requires_grad_() for t in inputs]
    loss = fn(*leaves, target)
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_fullgraph_matches_eager_and_float64(reduction, backend):
    torch._dynamo.reset()
    hidden, weight, target, s, b = make_inputs(37, 19, 53, bias=True, seed=3)
    fn = _loss_fn(reduction, **OPTIONS)
    eager = _grads(fn, (hidden, weight, b, s), target)
    compiled = _grads(torch.compile(fn, fullgraph=True, backend=backend), (hidden, weight, b, s), target)
    names = ("loss", "d hidden", "d weight", "d bias", "d sample_weight")
    for name, e, c in zip(names, eager, compiled):
        # the same kernels in the same order: equal up to the last bits of the final scaling
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7, msg=name)
    # and not only self-consistent: against plain float64 (reduction "none": the weighted sum above)
    kw = dict(eps=0.1, softcap=3.0, z_loss=0.01, reduction=reduction)
    if reduction == "none":
        kw["upstream"] = torch.linspace(0.5, 1.5, 37)
    ref = plain(hidden, weight, target, s, b, dtype=torch.float64, **kw)
    same = plain(hidden, weight, target, s, b, dtype=torch.float32, **kw)
    factor = 2.0 if reduction != "none" else 1.0
    for name, c, r, p in zip(names[1:], compiled[1:], ref[1:], same[1:]):
        assert_close_rel(name, c, r * factor, p * factor, torch.float32)


def test_compiled_with_inductor():
    torch._dynamo.reset()
    hidden, weight, target, s, b = make_inputs(16, 8, 30, bias=True, seed=4)
    fn = _loss_fn("mean", class_weight=torch.rand(30, generator=torch.Generator().manual_seed(0)), **OPTIONS)
    eager = _grads(fn, (hidden, weight, b, s), target)
    compiled = _grads(torch.compile(fn, fullgraph=True, backend="inductor"), (hidden, weight, b, s), target)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)


def test_compiled_without_grad_and_with_lse():
    torch._dynamo.reset()
    hidden, weight, target, s, _ = make_inputs(12, 6, 20, seed=5)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(h, w):
        with torch.no_grad():
            return linear_cross_entropy(h, w, target, s, return_lse=True)

    loss, lse = fn(hidden, weight.requires_grad_())
    eager_loss, eager_lse = linear_cross_entropy(hidden, weight.detach(), target, s, return_lse=True)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(lse, eager_lse, rtol=1e-6, atol=0)


def test_compiled_bad_target_is_an_assert():
    # under compile the target check is torch._assert_async (a device-side assert on CUDA), not a host read
    torch._dynamo.reset()
    hidden, weight, target, s, _ = make_inputs(6, 4, 10, seed=6)
    target[2] = 10
    fn = torch.compile(lambda h, w: linear_cross_entropy(h, w, target, s), fullgraph=True, backend="eager")
    with pytest.raises(RuntimeError, match=r"a target is outside \[0, 10\)"):
        fn(hidden, weight)


# ---- opcheck: every op megaclass registers


def _op_inputs(reduction, need, *, class_weight=False):
    hidden, weight, target, s, b = make_inputs(13, 6, 21, bias=True, seed=7)
    call = lce._Call(0, "", -100, 0.1, reduction, 4, "full", "auto", 2.0, 0.01, need)
    cw = torch.rand(21, generator=torch.Generator().manual_seed(1)) if class_weight else None
    flags = [c == "1" for c in need]
    return (hidden.requires_grad_(flags[0]), weight.requires_grad_(flags[1]), b.requires_grad_(flags[2]), target,
            s.requires_grad_(flags[3]), cw, call.spec)


@pytest.mark.parametrize("reduction,need,class_weight", [("mean", "1111", False), ("sum", "0100", True),
                                                         ("none", "1111", True), ("mean", "0000", False)])
def test_opcheck_the_op(reduction, need, class_weight):
    torch.library.opcheck(torch.ops.megaclass.linear_cross_entropy.default,
                          _op_inputs(reduction, need, class_weight=class_weight))


def test_opcheck_the_backward_op():
    hidden, weight, b, target, s, cw, spec = _op_inputs("none", "1110", class_weight=True)
    out = torch.ops.megaclass.linear_cross_entropy(hidden.detach(), weight.detach(), b.detach(), target, s.detach(),
                                                   cw, spec)
    grad = torch.linspace(0.5, 1.5, 13)
    torch.library.opcheck(torch.ops.megaclass.linear_cross_entropy_backward.default,
                          (grad, hidden.detach(), weight.detach(), b.detach(), target, s.detach(), cw, out[6], out[1],
                           out[7], out[8], spec))


@needs_extension
@pytest.mark.parametrize("softcap,weighted", [(0.0, False), (2.0, True)])
def test_opcheck_the_kernels(softcap, weighted):
    gen = torch.Generator().manual_seed(8)
    logits, target = torch.randn(5, 33, generator=gen) * 3, torch.tensor([0, 32, -100, 7, 40])
    cw = torch.rand(33, generator=gen) if weighted else None
    ops = torch.ops.megaclass
    torch.library.opcheck(ops.lce_chunk_stats.default, (logits.clone(), target, 0, not softcap, softcap, cw))
    shift, row_coef, p_coef = torch.rand(5, generator=gen) + 3, torch.rand(5, generator=gen), torch.rand(5, generator=gen)
    torch.library.opcheck(ops.lce_chunk_grad_.default,
                          (logits.clone(), target, 0, shift, row_coef, 0.9, 0.01, False, softcap, cw, p_coef))
    torch.library.opcheck(ops.lce_chunk_stats_grad_.default,
                          (logits.clone(), target, row_coef, 0.9, 0.01, softcap, cw, 0.02))


# ---- a process group: compiled with a group, and the agreement's collective counted


def _group_rank(rank, world):
    group = comm.default_group()
    start, end = rank * 11, (rank + 1) * 11  # 22 classes over 2 ranks
    hidden, weight, target, s, b = make_inputs(9, 5, 22, bias=True, seed=9)
    weight, b = weight[start:end].contiguous(), b[start:end].contiguous()
    tables = []
    real = comm.gather_ints
    comm.gather_ints = lambda *args, **kw: tables.append(1) or real(*args, **kw)
    try:
        # the op as torch.compile runs it (host checks off): one agreement for three calls of one kind
        spec = lce._Call(start, comm.group_name(group), -100, 0.0, "mean", 0, "full", "auto", 0.0, 0.0, "0000").spec
        losses = [torch.ops.megaclass.linear_cross_entropy(hidden, weight, b, target, s, None, spec)[0]
                  for _ in range(3)]
        counts = [len(tables)]
        torch.ops.megaclass.linear_cross_entropy(hidden[:7], weight, b, target[:7], s[:7], None, spec)  # new shape
        counts.append(len(tables))
        # eager CPU keeps its host checks: one small table per call
        for _ in range(2):
            linear_cross_entropy(hidden, weight, target, s, bias=b, class_start=start, process_group=group)
        counts.append(len(tables))
    finally:
        comm.gather_ints = real
    fn = _loss_fn("mean", group, class_start=start, **OPTIONS)
    torch._dynamo.reset()
    eager = _grads(fn, (hidden, weight, b, s), target)
    compiled = _grads(torch.compile(fn, fullgraph=True, backend="eager"), (hidden, weight, b, s), target)
    return counts, [float(x) for x in losses], [t.numpy() for t in eager], [t.numpy() for t in compiled]


def test_process_group_agreement_once_and_compiled():
    for counts, losses, eager, compiled in run_ranks(_group_rank, 2):
        assert counts == [1, 2, 4], counts
        assert losses[0] == losses[1] == losses[2]
        for e, c in zip(eager, compiled):
            torch.testing.assert_close(torch.from_numpy(c), torch.from_numpy(e), rtol=1e-6, atol=1e-7)


# ---- CUDA: no host synchronisation in forward or backward


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("compiled", [False, True])
def test_no_host_synchronisation_on_cuda(reduction, compiled):
    hidden, weight, target, s, b = (t.cuda() for t in make_inputs(64, 16, 500, bias=True, seed=10))
    fn = _loss_fn(reduction, **OPTIONS)
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b, s)]
    fn(*leaves, target).backward()  # the first call of a kind agrees (and may synchronise) once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            fn(*leaves, target).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(leaves[1].grad).all()
