"""The fused op with classes split over 2 and 3 gloo ranks (uneven shards) against the one-process
float64 reference, with and without the loss options (softcap, z_loss, class_weight, return_lse), and bad
input across ranks: the same ValueError on every rank, never a hang."""
from __future__ import annotations

import re
import warnings

import torch

from dist_utils import run_ranks
from lce_reference import assert_close_rel, make_inputs, plain
from megaclass.nn import shard_range
from megaclass.ops import kernels, linear_cross_entropy
from megaclass.parallel import comm

N, D, C = 23, 7, 31  # 31 classes: shards 16+15 on 2 ranks, 11+10+10 on 3

# (reduction, label smoothing, bias, hidden_grad, chunk_size, dtype); bf16 over several chunks takes the
# by-class gradient path (class blocks inside each rank's shard)
F32, BF16 = torch.float32, torch.bfloat16
CASES = [("mean", 0.0, False, "full", 5, F32), ("sum", 0.1, True, "full", None, F32), ("none", 0.2, True, "full", 4, F32),
         ("mean", 0.1, True, "partial", 6, F32), ("sum", 0.1, True, "full", 5, BF16), ("none", 0.0, False, "full", 4, BF16)]


# (reduction, label smoothing, chunk_size, dtype, options): class weights are split like the classes
CLASS_WEIGHT = torch.rand(C, generator=torch.Generator().manual_seed(7)) * 2
ALL = dict(softcap=2.5, z_loss=0.05, class_weight=CLASS_WEIGHT)
OPTION_CASES = [("mean", 0.1, 5, F32, ALL), ("sum", 0.0, None, F32, dict(softcap=2.0)),
                ("none", 0.1, 4, F32, ALL), ("mean", 0.2, None, F32, dict(class_weight=CLASS_WEIGHT, z_loss=0.1)),
                ("sum", 0.1, 5, BF16, ALL)]


def _implementations():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ["torch"] + (["extension"] if kernels.extension() is not None else [])


def _upstream(reduction):
    return torch.randn(N, generator=torch.Generator().manual_seed(2)) if reduction == "none" else None


def _tp_rank(rank, world):
    start, end = shard_range(C, rank, world)
    group = comm.default_group()
    out = []
    for implementation in _implementations():
        for seed, (reduction, eps, bias, hidden_grad, chunk, dtype) in enumerate(CASES):
            hidden, weight, target, s, b = make_inputs(N, D, C, dtype, bias=bias, seed=seed)
            h = hidden.clone().requires_grad_()
            w = weight[start:end].clone().requires_grad_()
            bb = None if b is None else b[start:end].clone().requires_grad_()
            sw = s.clone().requires_grad_()
            loss = linear_cross_entropy(h, w, target, sw, bias=bb, class_start=start, process_group=group,
                                        reduction=reduction, label_smoothing=eps, chunk_size=chunk,
                                        hidden_grad=hidden_grad, implementation=implementation)
            inputs = [t for t in (h, w, bb, sw) if t is not None]
            upstream = _upstream(reduction)
            grads = torch.autograd.grad(loss, inputs, None if upstream is None else upstream.to(dtype))
            out.append([loss.detach().float().numpy()] + [g.float().numpy() for g in grads])
    return out, _option_rank(rank, world), _bad_input_cases(rank, world)  # spawning ranks is the slow part


def _option_rank(rank, world):
    start, end = shard_range(C, rank, world)
    out = []
    for implementation in _implementations():
        for seed, (reduction, eps, chunk, dtype, options) in enumerate(OPTION_CASES):
            hidden, weight, target, s, b = make_inputs(N, D, C, dtype, bias=True, seed=seed, scale=3.0)
            h = hidden.clone().requires_grad_()
            w = weight[start:end].clone().requires_grad_()
            bb = b[start:end].clone().requires_grad_()
            sw = s.clone().requires_grad_()
            local = dict(options)
            if "class_weight" in local:
                local["class_weight"] = local["class_weight"][start:end]
            loss, lse = linear_cross_entropy(h, w, target, sw, bias=bb, class_start=start,
                                             process_group=comm.default_group(), reduction=reduction,
                                             label_smoothing=eps, chunk_size=chunk, implementation=implementation,
                                             return_lse=True, **local)
            upstream = _upstream(reduction)
            grads = torch.autograd.grad(loss, [h, w, bb, sw], None if upstream is None else upstream.to(dtype))
            out.append([loss.detach().float().numpy()] + [g.float().numpy() for g in grads] + [lse.numpy()])
    return out


def _check_options(option_results, world):
    cases = [(impl, c) for impl in _implementations() for c in OPTION_CASES]
    for k, (impl, (reduction, eps, _, dtype, options)) in enumerate(cases):
        hidden, weight, target, s, b = make_inputs(N, D, C, dtype, bias=True, seed=k % len(OPTION_CASES), scale=3.0)
        kw = dict(eps=eps, reduction=reduction, upstream=_upstream(reduction), **options)
        ref = plain(hidden, weight, target, s, b, dtype=torch.float64, **kw)
        same = plain(hidden, weight, target, s, b, dtype=dtype, **kw)
        per_rank = [[torch.from_numpy(a) for a in r[k]] for r in option_results]
        label = f"{impl} {reduction} ε={eps} {sorted(options)} {dtype} P={world}"
        for rank in range(world):  # loss, d hidden, d sample_weight: the same on every rank
            for j, name in ((0, "loss"), (1, "d hidden"), (4, "d sample_weight")):
                assert_close_rel(f"{label}: {name} on rank {rank}", per_rank[rank][j], ref[j], same[j], dtype)
        for j, name in ((2, "d weight"), (3, "d bias")):  # concatenated over ranks in rank order
            assert_close_rel(f"{label}: {name}", torch.cat([r[j] for r in per_rank]), ref[j], same[j], dtype)
        z = hidden.double() @ weight.double().t() + b.double()
        z_same = (hidden.to(dtype) @ weight.to(dtype).t() + b.to(dtype)).float()
        if "softcap" in options:
            z, z_same = (options["softcap"] * torch.tanh(t / options["softcap"]) for t in (z, z_same))
        for rank in range(world):
            assert_close_rel(f"{label}: lse on rank {rank}", per_rank[rank][5], torch.logsumexp(z, 1),
                             torch.logsumexp(z_same, 1), dtype)


def _check_tp(world):
    results, option_results, messages = zip(*run_ranks(_tp_rank, world))
    _check_errors(messages)
    _check_options(option_results, world)
    cases = [(impl, c) for impl in _implementations() for c in CASES]
    for k, (impl, (reduction, eps, bias, hidden_grad, _, dtype)) in enumerate(cases):
        hidden, weight, target, s, b = make_inputs(N, D, C, dtype, bias=bias, seed=k % len(CASES))
        kw = dict(eps=eps, reduction=reduction, upstream=_upstream(reduction))
        ref = plain(hidden, weight, target, s, b, dtype=torch.float64, **kw)
        same = plain(hidden, weight, target, s, b, dtype=dtype, **kw)  # plain PyTorch in the input dtype
        ref = [t for t in ref if t is not None]
        same = [t for t in same if t is not None]
        per_rank = [[torch.from_numpy(a) for a in r[k]] for r in results]
        label = f"{impl} {reduction} ε={eps} bias={bias} hidden_grad={hidden_grad} {dtype} P={world}"
        for rank in range(world):  # the loss is the same on every rank
            assert_close_rel(f"{label}: loss on rank {rank}", per_rank[rank][0], ref[0], same[0], dtype)
        if hidden_grad == "full":
            for rank in range(world):
                assert_close_rel(f"{label}: d hidden on rank {rank}", per_rank[rank][1], ref[1], same[1], dtype)
        else:  # each rank returns its shard's part: they add up to the full gradient
            total = sum(r[1].double() for r in per_rank)
            assert_close_rel(f"{label}: Σ partial d hidden", total, ref[1], same[1], dtype)
        shards = range(2, len(ref) - 1)  # d weight (and d bias): concatenated over ranks in rank order
        for j in shards:
            full = torch.cat([r[j] for r in per_rank])
            assert_close_rel(f"{label}: grad {j}", full, ref[j], same[j], dtype)
        for rank in range(world):
            assert_close_rel(f"{label}: d sample_weight", per_rank[rank][-1], ref[-1], same[-1], dtype)


def test_two_ranks_uneven_shards_and_bad_input_on_one_rank():
    _check_tp(2)


def test_three_ranks_uneven_shards_and_bad_input_on_some_ranks():
    # bad input across ranks must raise the same ValueError on every rank, never hang the group
    _check_tp(3)


def _bad_input_cases(rank, world):
    """Each case breaks the arguments of one rank only (rank 0 or 1); every rank must raise."""
    group = comm.default_group()
    first, last = shard_range(10, rank, world)
    x, w, t = torch.randn(6, 4), torch.randn(last - first, 4), torch.tensor([0, 1, 2, 9, -100, 3])
    messages = []

    def attempt(hidden, weight, target, s=None, class_start=first, **options):
        try:
            linear_cross_entropy(hidden, weight, target, s, class_start=class_start, process_group=group, **options)
        except ValueError as exc:
            messages.append(str(exc))
        else:
            messages.append(None)

    one = rank == 1
    attempt(torch.randn(6, 5) if one else x, torch.randn(last - first, 5) if one else w, t)  # D differs
    attempt(x, w, t, class_start=first + 1 if one else first)  # a gap before rank 1
    attempt(x, w, t, class_start=first - 1 if one else first)  # rank 1 overlaps rank 0
    attempt(x, w, torch.tensor([0, 1, 99, 9, -100, 3]) if one else t)  # a bad target on rank 1 only
    attempt(x, w, t, torch.tensor([1.0, -1.0, 1, 1, 1, 1]) if rank == 0 else None)  # bad weight on rank 0
    attempt(torch.randn(7, 4) if one else x, w, torch.zeros(7, dtype=torch.long) if one else t)  # N differs
    attempt(x, w, t, softcap=30.0 if one else None)  # options differ
    attempt(x, w, t, z_loss=1e-4 if one else 0.0)
    attempt(x, w, t, class_weight=torch.ones(last - first) if one else None)
    attempt(x, w, t, class_weight=torch.full((last - first,), -1.0) if rank == 0 else torch.ones(last - first))
    attempt(x, w, t)  # the group is still in step: a valid call works
    return messages


# (the rank with the bad argument or None, its error, every other rank's error)
EXPECTED_ERRORS = [
    (None, r"ranks disagree on D \(features\): \[4, 5", None),
    (None, r"class shards do not tile \[0, C\)", None),
    (None, r"class shards do not tile \[0, C\)", None),
    (1, r"target\[2\] = 99 is outside \[0, 10\)", r"rank 1 has a target outside \[0, 10\)"),
    (0, r"sample_weight must be finite and non-negative: row 1 holds -1", r"rank 0 of the process group rejected"),
    (None, r"ranks disagree on N \(rows of hidden\): \[6, 7", None),
    (None, r"ranks disagree on softcap: \[None, 30.0", None),
    (None, r"ranks disagree on z_loss: \[0.0, 0.0001", None),
    (None, r"ranks disagree on class_weight presence: \[False, True", None),
    (0, r"class_weight must be finite and non-negative: class 0", r"rank 0 of the process group rejected"),
]


def _check_errors(messages):
    for case, (culprit, own, others) in enumerate(EXPECTED_ERRORS):
        for rank, rank_messages in enumerate(messages):
            message = rank_messages[case]
            assert message is not None, f"case {case}: rank {rank} did not raise"
            pattern = own if culprit is None or rank == culprit else others
            assert re.search(pattern, message), f"case {case}, rank {rank}: {message}"
    assert all(m[len(EXPECTED_ERRORS)] is None for m in messages)  # the group is still in step afterwards
