"""Hybrid parallelism: the backbone data-parallel under DeepSpeed (ZeRO 0, 2, 3) and the head split by
class must train exactly like one process holding the whole model on the whole global batch, also
when a step accumulates several micro-batches (the head is stepped outside DeepSpeed, so its gradient
must be scaled across micro-batches like the backbone's)."""
import os

import deepspeed
import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_ranks
from engine_helpers import FlatLinear, random_items

from megaclass.engine.config import config_from_dict
from megaclass.engine.data import epoch_order
from megaclass.engine.trainer import TrainData, Trainer

N, CLASSES, MICRO, ACCUM, STEPS, D = 48, 11, 4, 2, 3, 8  # 11 classes over 2 ranks: uneven shards (6 + 5)


def _config(run_dir, zero_stage):
    return config_from_dict({
        "run_dir": run_dir,
        "head": {"bias": True},
        "data": {"num_workers": 0},
        "optim": {"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 0.01, "schedule": "constant"},
        "train": {"micro_batch_size": MICRO, "grad_accum": ACCUM, "max_steps": STEPS, "progress": False, "seed": 3},
        "parallel": {"zero_stage": zero_stage},
    })


def _weights():
    return torch.rand(N, generator=torch.Generator().manual_seed(9)) + 0.1


def _train_ranks(rank, world, run_dir, stages):
    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed's engine asks for it (a launcher sets it)
    out = {}
    items = random_items(N, CLASSES)
    for stage in stages:
        torch.manual_seed(0)
        trainer = Trainer(_config(f"{run_dir}/zero{stage}", stage),
                          TrainData(items, CLASSES, items.labels, _weights()), backbone=FlatLinear(48, D))
        rows = trainer.fit()
        params = list(trainer.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            backbone = {k: v.detach().numpy().copy() for k, v in trainer.engine.module.named_parameters()}
        out[stage] = {"losses": [r["loss"] for r in rows], "backbone": backbone,  # numpy: tensors can't outlive the rank
                      "head_w": trainer.head.weight.detach().numpy().copy(),
                      "head_b": trainer.head.bias.detach().numpy().copy(), "classes": trainer.class_range}
        trainer.close()
    return out


def _reference():
    """One float64 process: whole backbone, whole classifier, whole global batch, plain F.cross_entropy."""
    items, weights = random_items(N, CLASSES), _weights().double()
    weights = weights / weights.mean()  # data.normalize_weights (default): weights scaled to mean 1
    torch.manual_seed(0)
    backbone = FlatLinear(48, D).double()
    with torch.random.fork_rng():
        torch.manual_seed(3 + 1)  # Trainer seeds the head with train.seed + 1
        from megaclass.nn import ShardedLinearCrossEntropy

        head = ShardedLinearCrossEntropy(D, CLASSES, bias=True).double()
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.2, momentum=0.9, weight_decay=0.01)
    order, global_batch, losses = epoch_order(N, 3, 0), 2 * MICRO * ACCUM, []
    for step in range(STEPS):
        idx = order[step * global_batch:(step + 1) * global_batch]
        logits = backbone(items.images[idx].double()) @ head.weight.T + head.bias
        loss = (weights[idx] * F.cross_entropy(logits, items.labels[idx], reduction="none")).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses, dict(backbone.named_parameters()), head.weight.detach(), head.bias.detach()


@pytest.mark.timeout(240)
def test_two_ranks_equal_one_process_for_zero_0_2_3(tmp_path):
    results = run_ranks(_train_ranks, 2, str(tmp_path), (0, 2, 3))
    losses, backbone, head_w, head_b = _reference()
    for stage in (0, 2, 3):
        (start0, end0), (start1, end1) = results[0][stage]["classes"], results[1][stage]["classes"]
        assert (start0, end0, start1, end1) == (0, 6, 6, 11)
        for rank in range(2):
            got = results[rank][stage]
            # float32 against float64 over 3 SGD steps: 1e-5 is ~100x float32 rounding of these sizes
            assert got["losses"] == pytest.approx(losses, rel=1e-5), f"zero {stage} rank {rank}"
            for name, value in backbone.items():
                torch.testing.assert_close(torch.from_numpy(got["backbone"][name]).double(), value.detach(), rtol=1e-5, atol=1e-5)
            lo, hi = got["classes"]
            # each rank's head rows are its own classes, trained by its own optimizer, never averaged
            torch.testing.assert_close(torch.from_numpy(got["head_w"]).double(), head_w[lo:hi], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.from_numpy(got["head_b"]).double(), head_b[lo:hi], rtol=1e-5, atol=1e-5)
        assert not (results[0][stage]["head_w"][:5] == results[1][stage]["head_w"][:5]).all()
