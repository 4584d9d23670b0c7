"""The fused op probed as a new user would (issue 11, items 1–4), with tiny inputs: uneven class shards at
the one-chunk bound, masked (−inf) classes, double backward, and ranks that disagree on an option. Each
case ends in F.cross_entropy's numbers (float64 reference) or in a clear error on every rank."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_ranks
from lce_reference import assert_close_rel, make_inputs, plain
from megaclass.nn import shard_range
from megaclass.ops import kernels, lce, linear_cross_entropy
from megaclass.parallel import comm


def _implementations():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ["torch"] + (["extension"] if kernels.extension() is not None else [])


IMPLEMENTATIONS = _implementations()

# ---- 1. uneven shards near the one-chunk bound: every rank must run the same chunks (and collectives)

UNEVEN_C, UNEVEN_N, UNEVEN_D = 32_769, 48, 4  # shard_range's split on 2 ranks: 16,385 + 16,384


def _uneven_rank(rank, world):
    # the byte bounds lowered so that rank 1's logits (48 × 16,384 fp32) are exactly one chunk and rank 0's
    # (one class more) are not: before the fix rank 0 ran several chunks (all-gathers), rank 1 one
    lce.WHOLE_BATCH_BYTES = UNEVEN_N * 16_384 * 4
    lce.CHUNK_BYTES = {"cpu": 16 * 16_385 * 4}
    lce.MIN_CHUNK_ROWS = 8
    start, end = shard_range(UNEVEN_C, rank, world)
    group = comm.default_group()
    hidden, weight, target, s, _ = make_inputs(UNEVEN_N, UNEVEN_D, UNEVEN_C, seed=1)
    out = {"chunk_rows": lce._validate(hidden, weight[start:end], target, s, None, start, group, -100, 0.0,
                                       "mean", None, "full", "torch").chunk_rows}
    for implementation in IMPLEMENTATIONS:
        h = hidden.clone().requires_grad_()
        w = weight[start:end].clone().requires_grad_()
        loss = linear_cross_entropy(h, w, target, s, class_start=start, process_group=group,
                                    implementation=implementation)
        loss.backward()
        out[implementation] = [t.detach().numpy() for t in (loss, h.grad, w.grad)]  # tensors cannot leave a rank
    # an explicit chunk_size that differs per rank: a clear error on both ranks, and the group still in step
    try:
        linear_cross_entropy(hidden, weight[start:end], target, s, class_start=start, process_group=group,
                             chunk_size=8 + rank)
    except ValueError as exc:
        out["chunk_size_error"] = str(exc)
    out["after"] = float(linear_cross_entropy(hidden, weight[start:end], target, s, class_start=start,
                                              process_group=group))
    out["disagreements"] = _disagreeing_rank(rank, world)  # item 4, in the same processes: spawning is slow
    return out


def test_uneven_shards_agree_on_the_chunks_and_disagreeing_options_raise_on_every_rank():
    results = run_ranks(_uneven_rank, 2)
    _check_disagreements([r["disagreements"] for r in results])
    assert results[0]["chunk_rows"] == results[1]["chunk_rows"] < UNEVEN_N
    hidden, weight, target, s, _ = make_inputs(UNEVEN_N, UNEVEN_D, UNEVEN_C, seed=1)
    ref = plain(hidden, weight, target, s, None, dtype=torch.float64)
    same = plain(hidden, weight, target, s, None, dtype=torch.float32)
    for implementation in IMPLEMENTATIONS:
        for rank, r in enumerate(results):
            loss, dx, _ = map(torch.from_numpy, r[implementation])
            assert_close_rel(f"{implementation} loss rank {rank}", loss, ref[0], same[0], torch.float32)
            assert_close_rel(f"{implementation} d hidden rank {rank}", dx, ref[1], same[1], torch.float32)
        dw = torch.cat([torch.from_numpy(r[implementation][2]) for r in results])
        assert_close_rel(f"{implementation} d weight", dw, ref[2], same[2], torch.float32)
    for r in results:
        assert re.search(r"ranks disagree on chunk_size: \[8, 9\]", r["chunk_size_error"]), r["chunk_size_error"]
        assert abs(r["after"] - float(ref[0])) < 1e-4


# ---- 2. masked classes: a −inf bias


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_minus_inf_bias_matches_cross_entropy(implementation, reduction, chunk_size):
    hidden, weight, target, s, bias = make_inputs(13, 6, 20, bias=True, seed=2)
    masked = torch.tensor([3, 7, 19])
    bias[masked] = float("-inf")
    target[torch.isin(target, masked)] = 0  # no row's target is masked: F.cross_entropy's loss is finite
    upstream = torch.rand(13, generator=torch.Generator().manual_seed(3)) if reduction == "none" else None
    ref = plain(hidden, weight, target, s, bias, dtype=torch.float64, reduction=reduction, upstream=upstream)
    same = plain(hidden, weight, target, s, bias, dtype=torch.float32, reduction=reduction, upstream=upstream)
    h, w, b, sw = (t.clone().requires_grad_() for t in (hidden, weight, bias, s))
    loss = linear_cross_entropy(h, w, target, sw, bias=b, reduction=reduction, chunk_size=chunk_size,
                                implementation=implementation)
    grads = torch.autograd.grad(loss, (h, w, b, sw), upstream)
    for name, ours, r, p in zip(("loss", "d hidden", "d weight", "d bias", "d sample_weight"),
                                (loss.detach(), *grads), ref, same):
        assert_close_rel(name, ours, r, p, torch.float32)  # also: finite everywhere
    assert (grads[2][masked] == 0).all()  # a masked class gets no gradient


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_minus_inf_bias_with_label_smoothing_is_what_cross_entropy_does(implementation):
    # smoothing spreads ε over every class, a masked one too: F.cross_entropy's loss is +inf, and so is
    # each row's sample-weight gradient, while the other gradients stay finite
    hidden, weight, target, s, bias = make_inputs(9, 5, 12, bias=True, seed=4, ignore_every=0)
    bias[[2, 5]] = float("-inf")
    target[(target == 2) | (target == 5)] = 0
    h64, w64, b64, s64 = (t.double().requires_grad_() for t in (hidden, weight, bias, s))
    ref_loss = (F.cross_entropy(torch.addmm(b64, h64, w64.t()), target, reduction="none", label_smoothing=0.1)
                * s64).mean()
    ref = torch.autograd.grad(ref_loss, (h64, w64, b64, s64))
    h, w, b, sw = (t.clone().requires_grad_() for t in (hidden, weight, bias, s))
    loss = linear_cross_entropy(h, w, target, sw, bias=b, label_smoothing=0.1, implementation=implementation)
    grads = torch.autograd.grad(loss, (h, w, b, sw))
    assert loss == ref_loss == float("inf")
    for name, ours, r in zip(("d hidden", "d weight", "d bias"), grads, ref):
        assert torch.isfinite(r).all() and torch.isfinite(ours).all(), name
        torch.testing.assert_close(ours.double(), r, rtol=1e-5, atol=1e-6, msg=name)
    assert (grads[3] == ref[3]).all() and (ref[3] == float("inf")).all()


# ---- 3. double backward


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_is_a_clear_error(implementation, reduction):
    hidden, weight, target, s, _ = make_inputs(8, 4, 10, seed=5)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, target, s, reduction=reduction, implementation=implementation)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss.sum(), h, create_graph=True)  # a gradient penalty would be dropped
    loss = linear_cross_entropy(h, w, target, s, reduction=reduction, implementation=implementation)
    (dx,) = torch.autograd.grad(loss.sum(), h)  # a first-order gradient still works
    assert torch.isfinite(dx).all() and not dx.requires_grad


# ---- 4. ranks that disagree on an option


DISAGREEMENTS = [  # (keyword, rank 0's value, rank 1's value, how the message names them)
    ("label_smoothing", 0.0, 0.1, r"label_smoothing: \[0\.0, 0\.1\]"),
    ("ignore_index", -100, -1, r"ignore_index: \[-100, -1\]"),
    ("reduction", "mean", "sum", r"reduction: \['mean', 'sum'\]"),
    ("hidden_grad", "full", "partial", r"hidden_grad: \['full', 'partial'\]"),
    ("chunk_size", None, 4, r"chunk_size: \[None, 4\]"),
]


def _disagreeing_rank(rank, world):
    start, end = shard_range(10, rank, world)
    group = comm.default_group()
    hidden, weight, target, s, _ = make_inputs(6, 4, 10, seed=6)
    messages = []
    for keyword, *values, _ in DISAGREEMENTS:
        try:
            linear_cross_entropy(hidden, weight[start:end], target, s, class_start=start, process_group=group,
                                 **{keyword: values[rank]})
        except ValueError as exc:
            messages.append(str(exc))
        else:
            messages.append(None)
    # hidden requiring grad on one rank only: that rank alone would all-reduce d hidden
    try:
        linear_cross_entropy(hidden.clone().requires_grad_(rank == 0), weight[start:end], target, s,
                             class_start=start, process_group=group)
    except ValueError as exc:
        messages.append(str(exc))
    else:
        messages.append(None)
    loss = linear_cross_entropy(hidden, weight[start:end], target, s, class_start=start, process_group=group)
    return messages, float(loss)


def _check_disagreements(results):
    hidden, weight, target, s, _ = make_inputs(6, 4, 10, seed=6)
    expected = float(plain(hidden, weight, target, s, None, dtype=torch.float64)[0])
    for rank, (messages, loss) in enumerate(results):
        patterns = [p for *_, p in DISAGREEMENTS] + [r"whether hidden's gradient is wanted"]
        assert len(messages) == len(patterns)
        for pattern, message in zip(patterns, messages):
            assert message is not None, f"rank {rank}: no error for {pattern}"
            assert re.search("ranks disagree on " + pattern, message), f"rank {rank}: {message}"
        assert abs(loss - expected) < 1e-5  # the group is still in step afterwards
