"""Hybrid parallelism: the backbone data-parallel under DeepSpeed (ZeRO 0, 2, 3) and the head split by
class must train exactly like one process holding the whole model on the whole global batch, also
when a step accumulates several micro-batches (the head is stepped outside DeepSpeed, so its gradient
must be scaled across micro-batches like the backbone's). The head's weight gradient goes straight
into its SGD momentum buffer (weight_grad_into), except with gradient clipping, which needs it bare."""
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
from megaclass.seeding import derive_seed

N, CLASSES, MICRO, ACCUM, STEPS, D = 48, 11, 4, 2, 3, 8  # 11 classes over 2 ranks: uneven shards (6 + 5)
CLIP = 0.3  # below every step's gradient norm of the backbone and of the head (the reference checks)
RUNS = {"zero0": (0, 0.0), "zero2": (2, 0.0), "zero3 clipped": (3, CLIP)}  # (stage, clip)


def _config(run_dir, zero_stage, grad_clip=0.0):
    return config_from_dict({
        "run_dir": run_dir,
        "head": {"bias": True},
        "data": {"num_workers": 0},
        "optim": {"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 0.01, "schedule": "constant",
                  "grad_clip": grad_clip},
        "train": {"micro_batch_size": MICRO, "grad_accum": ACCUM, "max_steps": STEPS, "progress": False, "seed": 3},
        "parallel": {"zero_stage": zero_stage},
    })


def _weights():
    return torch.rand(N, generator=torch.Generator().manual_seed(9)) + 0.1


def _train_ranks(rank, world, run_dir, runs):
    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed's engine asks for it (a launcher sets it)
    out = {}
    items = random_items(N, CLASSES)
    for name in runs:
        stage, clip = RUNS[name]
        torch.manual_seed(0)
        trainer = Trainer(_config(f"{run_dir}/{name.replace(' ', '_')}", stage, clip),
                          TrainData(items, CLASSES, items.labels, _weights()), backbone=FlatLinear(48, D))
        grad_at_step = []  # whether the head's weight had a weight.grad when its optimizer stepped
        step_head = trainer._step_head

        def spy():
            grad_at_step.append(trainer.head.weight.grad is not None)
            step_head()

        trainer._step_head = spy
        rows = trainer.fit()
        params = list(trainer.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            backbone = {k: v.detach().numpy().copy() for k, v in trainer.engine.module.named_parameters()}
        out[name] = {"losses": [r["loss"] for r in rows], "backbone": backbone,  # numpy: tensors can't outlive the rank
                     "head_w": trainer.head.weight.detach().numpy().copy(),
                     "head_b": trainer.head.bias.detach().numpy().copy(), "classes": trainer.class_range,
                     "grad_at_step": grad_at_step}
        trainer.close()
    return out


def _reference(clip=0.0):
    """One float64 process: whole backbone, whole classifier, whole global batch, plain F.cross_entropy;
    with `clip`, the backbone's and the head's gradients each clipped to that norm (DeepSpeed clips the
    engine's parameters, the trainer the head's)."""
    items, weights = random_items(N, CLASSES), _weights().double()
    weights = weights / weights.mean()  # data.normalize_weights (default): weights scaled to mean 1
    torch.manual_seed(0)
    backbone = FlatLinear(48, D).double()
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(3, "head"))  # as Trainer seeds the head (train.seed = 3)
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
        if clip:
            for part in (backbone, head):
                assert float(torch.nn.utils.clip_grad_norm_(part.parameters(), clip)) > clip  # it clips
        opt.step()
        losses.append(float(loss.detach()))
    return losses, dict(backbone.named_parameters()), head.weight.detach(), head.bias.detach()


@pytest.mark.timeout(240)
def test_two_ranks_equal_one_process_for_zero_0_2_3_and_clipping(tmp_path):
    results = run_ranks(_train_ranks, 2, str(tmp_path), list(RUNS))
    references = {clip: _reference(clip) for clip in (0.0, CLIP)}
    for run, (stage, clip) in RUNS.items():
        losses, backbone, head_w, head_b = references[clip]
        (start0, end0), (start1, end1) = results[0][run]["classes"], results[1][run]["classes"]
        assert (start0, end0, start1, end1) == (0, 6, 6, 11)
        for rank in range(2):
            got = results[rank][run]
            # folded into the momentum buffer (no weight.grad) unless clipping needs the gradient itself
            assert got["grad_at_step"] == [bool(clip)] * STEPS, f"{run} rank {rank}"
            # float32 against float64 over 3 SGD steps: 1e-5 is ~100x float32 rounding of these sizes
            assert got["losses"] == pytest.approx(losses, rel=1e-5), f"{run} rank {rank}"
            for name, value in backbone.items():
                torch.testing.assert_close(torch.from_numpy(got["backbone"][name]).double(), value.detach(), rtol=1e-5, atol=1e-5)
            lo, hi = got["classes"]
            # each rank's head rows are its own classes, trained by its own optimizer, never averaged
            torch.testing.assert_close(torch.from_numpy(got["head_w"]).double(), head_w[lo:hi], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.from_numpy(got["head_b"]).double(), head_b[lo:hi], rtol=1e-5, atol=1e-5)
        assert not (results[0][run]["head_w"][:5] == results[1][run]["head_w"][:5]).all()
