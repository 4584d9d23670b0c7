"""`ShardedLinearCrossEntropy`: uneven shards, shard initialization equal to the one-rank weight, the
data-parallel layout (gather_input=True) where the features' gradient must be summed exactly once, and the
weight's gradient folded into a buffer (weight_grad_into) in that layout."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_ranks
from megaclass.nn import ShardedLinearCrossEntropy, shard_range
from megaclass.parallel import comm

D, C, ROWS = 6, 17, 5  # 17 classes over 3 ranks: 6, 6, 5


def test_shard_range_tiles_with_extra_classes_first():
    for classes, world in ((17, 3), (10, 4), (3, 5), (8, 2)):
        ranges = [shard_range(classes, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [e - s for s, e in ranges]
        extra = classes % world
        assert sizes == [classes // world + (r < extra) for r in range(world)]


def test_one_rank_module_is_linear_plus_weighted_cross_entropy():
    torch.manual_seed(0)
    head = ShardedLinearCrossEntropy(D, C, label_smoothing=0.1)
    assert head.weight.shape == (C, D) and head.bias.shape == (C,)
    bound = 1 / D ** 0.5
    assert head.weight.abs().max() <= bound and head.weight.std() > bound / 3
    x = torch.randn(9, D, requires_grad=True)
    target, s = torch.randint(0, C, (9,)), torch.rand(9)
    loss = head(x, target, s)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    ref = (F.cross_entropy(x64 @ w64.T + head.bias.detach().double(), target, reduction="none",
                           label_smoothing=0.1) * s.double()).mean()
    ref.backward()
    assert torch.allclose(loss.double(), ref, rtol=1e-6)
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(head.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-7)


def test_one_rank_module_with_loss_options():
    # the module's class_weight is over all num_classes (it keeps its shard's slice, outside the state dict)
    torch.manual_seed(0)
    cw = torch.rand(C) * 2
    head = ShardedLinearCrossEntropy(D, C, label_smoothing=0.1, softcap=1.5, z_loss=0.01, class_weight=cw)
    assert "class_weight" not in head.state_dict()
    x, target = torch.randn(9, D) * 3, torch.randint(0, C, (9,))
    loss, lse = head(x, target, return_lse=True)
    z = 1.5 * torch.tanh((x.double() @ head.weight.detach().double().T + head.bias.detach().double()) / 1.5)
    ref = F.cross_entropy(z, target, weight=cw.double(), label_smoothing=0.1, reduction="sum")
    ref = (ref + 0.01 * (torch.logsumexp(z, 1) ** 2).sum()) / cw.double()[target].sum()
    assert torch.allclose(loss.double(), ref, rtol=1e-5)
    assert torch.allclose(lse.double(), torch.logsumexp(z, 1), rtol=1e-5)
    with pytest.raises(ValueError, match=r"class_weight must be a tensor of shape \[num_classes\] = \[17\]"):
        ShardedLinearCrossEntropy(D, C, class_weight=torch.ones(C - 1))


def test_bad_sizes():
    with pytest.raises(ValueError, match="in_features and num_classes must be positive"):
        ShardedLinearCrossEntropy(0, 10)


def _rank_inputs(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(ROWS, D, generator=gen), torch.randint(0, C, (ROWS,), generator=gen), torch.rand(ROWS, generator=gen)


def _module_rank(rank, world):
    torch.manual_seed(0)
    head = ShardedLinearCrossEntropy(D, C, label_smoothing=0.1)  # None: the default (world) group
    shard = (head.class_start, head.class_end, head.weight.detach().clone().numpy(), head.bias.detach().clone().numpy())

    # data parallel: every rank has its own rows; the loss is over the all-gathered batch
    features, target, s = _rank_inputs(rank)
    features.requires_grad_()
    tables = []
    real_gather_ints = comm.gather_ints
    comm.gather_ints = lambda *args, **kw: tables.append(1) or real_gather_ints(*args, **kw)
    try:
        loss = head(features, target, s, gather_input=True)
        # bad input: an error on every rank from the same one validation collective, never a hang
        errors = []
        for bad in ((features[:ROWS - 1 if rank == 1 else ROWS], target[:ROWS - 1 if rank == 1 else ROWS],
                     s[:ROWS - 1 if rank == 1 else ROWS]),
                    (features, target, s.clone().requires_grad_(rank == 0))):
            try:
                head(*bad, gather_input=True)
            except ValueError as err:
                errors.append(str(err))
    finally:
        comm.gather_ints = real_gather_ints
    assert len(tables) == 3, tables  # one validation table per call, none extra for the row count
    loss.backward()
    dp = (loss.detach().numpy(), features.grad.numpy(), head.weight.grad.numpy(), head.bias.grad.numpy())

    # tensor parallel: the same rows on every rank
    head.zero_grad()
    everything = [_rank_inputs(r) for r in range(world)]
    x = torch.cat([e[0] for e in everything]).requires_grad_()
    loss_tp = head(x, torch.cat([e[1] for e in everything]), torch.cat([e[2] for e in everything]))
    loss_tp.backward()
    tp = (loss_tp.detach().numpy(), x.grad.numpy(), head.weight.grad.numpy())

    # data parallel with the weight's gradient folded into a buffer: buffer ← 0.5·buffer + dW
    head.zero_grad(set_to_none=True)
    buffer0 = torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(7 + rank))
    buffer = buffer0.clone()
    head(features.detach(), target, s, gather_input=True, weight_grad_into=(buffer, 0.5)).backward()
    folded = (buffer0.numpy(), buffer.numpy(), head.weight.grad is None, head.bias.grad.numpy())
    return shard, dp, tp, folded, errors


def test_three_ranks_init_gather_input_and_tensor_parallel():
    world = 3
    results = run_ranks(_module_rank, world)
    torch.manual_seed(0)
    single = ShardedLinearCrossEntropy(D, C, label_smoothing=0.1)
    for rank, (*_, errors) in enumerate(results):
        assert len(errors) == 2, errors
        assert f"[{ROWS}, {ROWS - 1}, {ROWS}] (rank order) (gather_input=True needs the same number of rows" in errors[0]
        assert ("sample_weight requires grad" in errors[1]) == (rank == 0), errors[1]
        assert rank == 0 or "rank 0 of the process group rejected" in errors[1], errors[1]
    for rank, (shard, *_) in enumerate(results):
        start, end, w, b = shard
        assert (start, end) == shard_range(C, rank, world)
        assert torch.equal(torch.from_numpy(w), single.weight.detach()[start:end])  # bit-exact
        assert torch.equal(torch.from_numpy(b), single.bias.detach()[start:end])

    # float64 reference of the global batch, computed in one process
    everything = [_rank_inputs(r) for r in range(world)]
    x = torch.cat([e[0] for e in everything]).double().requires_grad_()
    target = torch.cat([e[1] for e in everything])
    s = torch.cat([e[2] for e in everything]).double()
    w = single.weight.detach().double().requires_grad_()
    b = single.bias.detach().double().requires_grad_()
    ref = (F.cross_entropy(x @ w.T + b, target, reduction="none", label_smoothing=0.1) * s).mean()
    ref.backward()
    for rank, (shard, dp, tp, folded, _) in enumerate(results):
        start, end = shard[:2]
        loss, dfeat, dw, db = (torch.from_numpy(a).double() for a in dp)
        assert torch.allclose(loss, ref, rtol=1e-6)
        # summed once: a doubled sum (all-reduce in the op AND reduce-scatter in gather_rows) would be 3×
        assert torch.allclose(dfeat, x.grad[rank * ROWS:(rank + 1) * ROWS], rtol=1e-5, atol=1e-8)
        assert torch.allclose(dw, w.grad[start:end], rtol=1e-5, atol=1e-8)
        assert torch.allclose(db, b.grad[start:end], rtol=1e-5, atol=1e-8)
        loss_tp, dx_tp, dw_tp = (torch.from_numpy(a).double() for a in tp)
        assert torch.allclose(loss_tp, ref, rtol=1e-6)
        assert torch.allclose(dx_tp, x.grad, rtol=1e-5, atol=1e-8)
        assert torch.allclose(dw_tp, w.grad[start:end], rtol=1e-5, atol=1e-8)
        buffer0, buffer, no_weight_grad, db_folded = folded
        assert no_weight_grad
        expected = 0.5 * torch.from_numpy(buffer0).double() + w.grad[start:end]
        assert torch.allclose(torch.from_numpy(buffer).double(), expected, rtol=1e-5, atol=1e-7)
        assert torch.allclose(torch.from_numpy(db_folded).double(), b.grad[start:end], rtol=1e-5, atol=1e-8)


def test_default_group_is_none_without_distributed():
    assert comm.default_group() is None
    assert ShardedLinearCrossEntropy(D, C).world == 1
