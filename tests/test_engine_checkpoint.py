"""Checkpoints: resume gives the losses of an uninterrupted run; a save that dies halfway leaves the
previous checkpoint usable; head shards re-shard to another number of ranks."""
import os

import pytest
import torch
from dist_utils import run_ranks
from engine_helpers import FlatLinear, random_items
from torch import nn

from megaclass.engine import checkpoint
from megaclass.engine.config import config_from_dict
from megaclass.engine.head import head_shard_state, load_head_shard, save_head_shard
from megaclass.engine.trainer import TrainData, Trainer

N, CLASSES = 32, 7


def _trainer(run_dir, max_steps):
    cfg = config_from_dict({
        "run_dir": run_dir, "head": {"bias": True}, "data": {"num_workers": 0},
        "optim": {"name": "sgd", "lr": 0.3, "momentum": 0.9, "warmup_steps": 2, "schedule": "cosine"},
        "train": {"micro_batch_size": 2, "grad_accum": 2, "epochs": 2, "max_steps": max_steps, "progress": False},
    })
    items = random_items(N, CLASSES)
    torch.manual_seed(0)
    weights = torch.linspace(0.2, 1.5, N)
    return Trainer(cfg, TrainData(items, CLASSES, items.labels, weights), backbone=FlatLinear(48, 8, dropout=0.3))


def _losses(rows):
    return {r["step"]: r["loss"] for r in rows}


def _first_part(rank, world, root):
    os.environ["LOCAL_RANK"] = str(rank)
    t = _trainer(f"{root}/split", max_steps=3)  # 4 steps per epoch: stops mid-epoch, inside warm-up's end
    rows = t.fit()
    t.close()
    return _losses(rows)


def _second_part_and_reference(rank, world, root):
    os.environ["LOCAL_RANK"] = str(rank)
    t = _trainer(f"{root}/split", max_steps=6)
    resumed = _losses(t.fit())
    head_after = t.head.weight.detach().numpy().copy()

    # a save that dies halfway: DeepSpeed's part fails after writing a partial file
    def broken_save(save_dir, tag, **_):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        open(os.path.join(save_dir, tag, "partial.pt"), "wb").write(b"\0" * 100)
        raise OSError("disk full (simulated)")

    t.step += 1
    t.engine.save_checkpoint = broken_save
    try:
        t.save()
        died = False
    except OSError:
        died = True
    t.close()
    latest = open(f"{root}/split/checkpoints/latest").read()
    again = _trainer(f"{root}/split", max_steps=6)
    step_again = again.resume()
    head_again = again.head.weight.detach().numpy().copy()
    again.close()

    full = _trainer(f"{root}/full", max_steps=6)
    uninterrupted = _losses(full.fit())
    full.close()
    return {"resumed": resumed, "uninterrupted": uninterrupted, "died": died, "latest": latest,
            "step_again": step_again, "head_after": head_after, "head_again": head_again}


@pytest.mark.timeout(240)
def test_resume_continues_with_the_same_losses_and_a_dead_save_leaves_the_last_one(tmp_path):
    first = run_ranks(_first_part, 2, str(tmp_path))
    second = run_ranks(_second_part_and_reference, 2, str(tmp_path))
    for rank in range(2):
        got = second[rank]
        assert sorted(first[rank]) == [1, 2, 3] and sorted(got["resumed"]) == [4, 5, 6]
        both = {**first[rank], **got["resumed"]}
        # same arithmetic in the same order: resumed and uninterrupted runs agree to the last bit
        assert both == got["uninterrupted"]
        assert got["died"] and got["latest"] == "step-00000006" and got["step_again"] == 6
        assert (got["head_after"] == got["head_again"]).all()
    assert os.path.isdir(tmp_path / "split/checkpoints/.tmp-step-00000007")  # the dead save's leftovers
    assert sorted(p for p in os.listdir(tmp_path / "split/checkpoints") if p.startswith("step-")) == \
        ["step-00000003", "step-00000006"]


class _Shard(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())


def _shards(weight, bias, ranges):
    return [_Shard(weight[lo:hi], bias[lo:hi]) for lo, hi in ranges]


def test_head_shards_reshard_from_two_ranks_to_three(tmp_path):
    classes, dim = 11, 5
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(classes, dim, generator=g), torch.randn(classes, generator=g)
    momentum_w, momentum_b = torch.randn(classes, dim, generator=g), torch.randn(classes, generator=g)
    for (lo, hi), shard in zip([(0, 6), (6, 11)], _shards(weight, bias, [(0, 6), (6, 11)])):
        opt = torch.optim.SGD(shard.parameters(), lr=0.1, momentum=0.9)
        opt.state[shard.weight] = {"momentum_buffer": momentum_w[lo:hi].clone()}
        opt.state[shard.bias] = {"momentum_buffer": momentum_b[lo:hi].clone()}
        save_head_shard(str(tmp_path / f"shard-{lo:09d}.pt"), head_shard_state(shard, opt, (lo, hi), classes))
    new_ranges = [(0, 4), (4, 8), (8, 11)]
    for (lo, hi), shard in zip(new_ranges, _shards(torch.zeros(classes, dim), torch.zeros(classes), new_ranges)):
        opt = torch.optim.SGD(shard.parameters(), lr=0.1, momentum=0.9)
        load_head_shard(str(tmp_path), shard, opt, (lo, hi), classes)
        assert torch.equal(shard.weight.detach(), weight[lo:hi]) and torch.equal(shard.bias.detach(), bias[lo:hi])
        assert torch.equal(opt.state[shard.weight]["momentum_buffer"], momentum_w[lo:hi])
        assert torch.equal(opt.state[shard.bias]["momentum_buffer"], momentum_b[lo:hi])


def test_head_shards_that_do_not_cover_the_classes_are_an_error(tmp_path):
    shard = _Shard(torch.zeros(6, 2), torch.zeros(6))
    opt = torch.optim.SGD(shard.parameters(), lr=0.1)
    save_head_shard(str(tmp_path / "shard-000000000.pt"), head_shard_state(shard, opt, (0, 6), 11))
    target = _Shard(torch.zeros(5, 2), torch.zeros(5))
    with pytest.raises(ValueError, match="do not cover class 6"):
        load_head_shard(str(tmp_path), target, None, (6, 11), 11)
    with pytest.raises(ValueError, match="head has 11 classes, this run 12"):
        load_head_shard(str(tmp_path), target, None, (6, 11), 12)


def test_latest_naming_a_missing_checkpoint_is_an_error(tmp_path):
    (tmp_path / "latest").write_text("step-00000009")
    with pytest.raises(FileNotFoundError, match="step-00000009"):
        checkpoint.latest_checkpoint(str(tmp_path))
