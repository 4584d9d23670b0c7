"""Checkpoints: resume gives the losses of an uninterrupted run; a save that dies halfway leaves the
previous checkpoint usable; head shards re-shard to another number of ranks."""
import os

import pytest
import torch
from dist_utils import run_ranks
from engine_helpers import FlatLinear, random_items, resume_errors
from torch import nn

from megaclass.engine import checkpoint
from megaclass.engine.config import config_from_dict
from megaclass.nn.checkpoint import head_shard_state, load_head_shard, save_head_shard
from megaclass.engine.trainer import TrainData, Trainer

N, CLASSES = 32, 7


def _trainer(run_dir, max_steps, wnids=None):
    cfg = config_from_dict({
        "run_dir": run_dir, "head": {"bias": True}, "data": {"num_workers": 0},
        "optim": {"name": "sgd", "lr": 0.3, "momentum": 0.9, "warmup_steps": 2, "schedule": "cosine"},
        "train": {"micro_batch_size": 2, "grad_accum": 2, "epochs": 2, "max_steps": max_steps, "progress": False},
    })
    items = random_items(N, CLASSES)
    torch.manual_seed(0)
    weights = torch.linspace(0.2, 1.5, N)
    return Trainer(cfg, TrainData(items, CLASSES, items.labels, weights, wnids), backbone=FlatLinear(48, 8, dropout=0.3))


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
    except checkpoint.SaveError as exc:
        died = "disk full (simulated)" in str(exc)
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
    assert not os.path.exists(tmp_path / "split/checkpoints/.tmp-step-00000007")  # the dead save's partial folder
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


def test_head_shards_slice_the_state_they_record_as_per_row_and_old_shards_still_load(tmp_path):
    """A state tensor is re-sharded because the shard says it is per-row, not because its first
    dimension happens to equal the shard's row count (here 5 rows and a [5] per-column statistic)."""
    classes, dim = 10, 5
    g = torch.Generator().manual_seed(1)
    weight, momentum = torch.randn(classes, dim, generator=g), torch.randn(classes, dim, generator=g)
    column = [torch.randn(dim, generator=g) for _ in range(2)]
    for part, ((lo, hi), shard) in enumerate(zip([(0, 5), (5, 10)], _shards(weight, torch.zeros(classes), [(0, 5), (5, 10)]))):
        opt = torch.optim.SGD(shard.parameters(), lr=0.1, momentum=0.9)
        opt.state[shard.weight] = {"momentum_buffer": momentum[lo:hi].clone(), "column": column[part].clone()}
        state = head_shard_state(shard, opt, (lo, hi), classes)
        assert state["per_row"]["weight"] == ["momentum_buffer"]
        save_head_shard(str(tmp_path / "new" / f"shard-{lo:09d}.pt"), state)
        state.pop("per_row")  # as written before shards recorded it
        save_head_shard(str(tmp_path / "old" / f"shard-{lo:09d}.pt"), state)
    target = _Shard(torch.zeros(3, dim), torch.zeros(3))
    opt = torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9)
    load_head_shard(str(tmp_path / "new"), target, opt, (0, 3), classes)
    assert torch.equal(opt.state[target.weight]["momentum_buffer"], momentum[:3])
    assert torch.equal(opt.state[target.weight]["column"], column[0])  # whole, not its first 3 entries
    old = torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9)
    load_head_shard(str(tmp_path / "old"), target, old, (0, 3), classes)
    assert torch.equal(old.state[target.weight]["momentum_buffer"], momentum[:3])


def test_head_shards_that_do_not_cover_the_classes_are_an_error(tmp_path):
    shard = _Shard(torch.zeros(6, 2), torch.zeros(6))
    opt = torch.optim.SGD(shard.parameters(), lr=0.1)
    save_head_shard(str(tmp_path / "shard-000000000.pt"), head_shard_state(shard, opt, (0, 6), 11))
    target = _Shard(torch.zeros(5, 2), torch.zeros(5))
    with pytest.raises(ValueError, match="do not cover class 6"):
        load_head_shard(str(tmp_path), target, None, (6, 11), 11)
    with pytest.raises(ValueError, match="head has 11 classes, this run 12"):
        load_head_shard(str(tmp_path), target, None, (6, 11), 12)


def test_a_head_shard_creates_its_folder(tmp_path):
    """Every rank writes its own shard: none may rely on another rank (on another node) making the folder."""
    shard = _Shard(torch.ones(3, 2), torch.zeros(3))
    path = tmp_path / ".tmp-step-00000001" / "head" / "shard-000000000.pt"
    save_head_shard(str(path), head_shard_state(shard, torch.optim.SGD(shard.parameters(), lr=0.1), (0, 3), 3))
    assert torch.equal(torch.load(path, weights_only=True)["params"]["weight"], torch.ones(3, 2))


def test_a_head_shard_saves_without_copying_whole_tensors_and_only_the_rows_of_a_view(tmp_path):
    """A CPU head shard is hundreds of MB: its state holds the live tensors; a view (torch.save would
    write its whole storage) is copied to its own rows."""
    shard = _Shard(torch.randn(4, 3), torch.randn(4))
    opt = torch.optim.SGD(shard.parameters(), lr=0.1, momentum=0.9)
    big = torch.randn(1000, 3)
    opt.state[shard.weight] = {"momentum_buffer": big[10:14]}
    state = head_shard_state(shard, opt, (0, 4), 4)
    assert state["params"]["weight"].data_ptr() == shard.weight.data_ptr()
    path = tmp_path / "shard-000000000.pt"
    save_head_shard(str(path), state)
    assert os.path.getsize(path) < big.numel() * 4 / 2  # not the 12 KB storage behind the view
    target = _Shard(torch.zeros(4, 3), torch.zeros(4))
    opt2 = torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9)
    load_head_shard(str(tmp_path), target, opt2, (0, 4), 4)
    assert torch.equal(target.weight.detach(), shard.weight.detach())
    assert torch.equal(opt2.state[target.weight]["momentum_buffer"], big[10:14])


def test_latest_naming_a_missing_checkpoint_is_an_error(tmp_path):
    (tmp_path / "latest").write_text("step-00000009")
    with pytest.raises(FileNotFoundError, match="step-00000009"):
        checkpoint.latest_checkpoint(str(tmp_path))


class _OneUnreadable(torch.utils.data.Dataset):
    """Item 3 cannot be read: like ImageDataset, the dataset serves the next image in its place."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i + 1 if i == 3 else i]


def _one_rank_checks(rank, world, root):
    import json
    from unittest import mock

    os.environ["LOCAL_RANK"] = str(rank)
    ckpt = f"{root}/run/checkpoints"
    t = _trainer(f"{root}/run", max_steps=2)
    t.fit()
    t.close()

    again = _trainer(f"{root}/run", max_steps=2)
    assert again.resume() == 2
    meta = f"{ckpt}/step-00000002/meta.json"
    before = os.stat(meta).st_mtime_ns
    again.save()  # the step it just loaded: not written again
    skipped = os.stat(meta).st_mtime_ns == before and not os.path.exists(f"{ckpt}/.tmp-step-00000002")

    real_replace = os.replace

    def killed_before_the_new_folder_moves_in(src, dst):
        if os.path.basename(src).startswith(".tmp-step-"):
            raise OSError("killed (simulated)")
        return real_replace(src, dst)

    with mock.patch.object(os, "replace", killed_before_the_new_folder_moves_in):
        try:
            checkpoint.save(ckpt, 2, again.engine, again.head, again.head_optimizer, again.class_range, CLASSES,
                            writer=True)
            died = False
        except OSError:
            died = True
    head_saved = again.head.weight.detach().clone()
    again.close()
    folder = checkpoint.latest_checkpoint(ckpt)
    third = _trainer(f"{root}/run", max_steps=2)
    step_third = third.resume()
    head_third = third.head.weight.detach().clone()
    items = random_items(N, CLASSES)
    probs, classes = third.predict(_OneUnreadable(items), k=3)
    third.close()

    with open(os.path.join(folder, "meta.json")) as f:
        saved = json.load(f)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({**saved, "world_size": 2, "zero_stage": 2}, f)
    other_world = _trainer(f"{root}/run", max_steps=2)
    try:
        other_world.resume()
        world_error = None
    except checkpoint.CheckpointError as exc:
        world_error = str(exc)
    other_world.close()
    return {"skipped": skipped, "died": died, "folder": os.path.basename(folder), "step": step_third,
            "same_head": bool(torch.equal(head_saved, head_third)), "classes": classes.numpy(), "probs": probs.numpy(),
            "world_error": world_error}


@pytest.mark.timeout(180)
def test_resave_skips_the_loaded_step_a_killed_resave_stays_loadable_and_another_world_and_stage_is_refused(tmp_path):
    got = run_ranks(_one_rank_checks, 1, str(tmp_path))[0]
    assert got["skipped"]
    # the re-save died after moving the old folder aside: `latest` still resolves, to that folder
    assert got["died"] and got["folder"] == ".old-step-00000002"
    assert got["step"] == 2 and got["same_head"]
    # the unreadable image has no prediction (class -1, probability 0), not "class 0"
    assert (got["classes"][3] == -1).all() and (got["probs"][3] == 0).all()
    others = [i for i in range(N) if i != 3]
    assert (got["classes"][others] >= 0).all() and (got["probs"][others] > 0).all()
    # a ZeRO 2 checkpoint of 2 ranks into 1 rank at ZeRO 0: the universal checkpoint needs the same stage
    assert got["world_error"] is not None and "2 ranks with ZeRO stage 2, resumed by 1 ranks with ZeRO stage 0" \
        in got["world_error"]
    assert "universal checkpoint, which megaclass converts for the same ZeRO stage only" in got["world_error"]


def _knee_weights(rank, world, root):
    os.environ["LOCAL_RANK"] = str(rank)
    cfg = config_from_dict({"run_dir": root, "data": {"num_workers": 0, "weight_knee": 0.5},
                            "train": {"micro_batch_size": 2, "progress": False}})
    items = random_items(5, CLASSES)
    weights = torch.tensor([0.1, 0.25, 0.5, 0.75, 1.0])
    t = Trainer(cfg, TrainData(items, CLASSES, items.labels, weights), backbone=FlatLinear(48, 8))
    out = t.data.sample_weights.numpy().copy()
    t.close()
    return out


def test_weight_knee_counts_weights_above_it_fully_and_scales_those_below(tmp_path):
    (got,) = run_ranks(_knee_weights, 1, str(tmp_path))
    kneed = torch.tensor([0.2, 0.5, 1.0, 1.0, 1.0], dtype=torch.float64)  # min(1, w / 0.5) by hand
    torch.testing.assert_close(torch.from_numpy(got).double(), kneed / kneed.mean())  # then mean 1


WNIDS = [f"n{i:08d}" for i in range(CLASSES)]


def _class_lists(rank, world, root):
    import json

    os.environ["LOCAL_RANK"] = str(rank)
    t = _trainer(root, max_steps=1, wnids=WNIDS)
    t.fit()
    t.close()
    with open(f"{root}/checkpoints/step-00000001/meta.json") as f:
        stored = json.load(f)["classes"]
    swapped = WNIDS[:2][::-1] + WNIDS[2:]
    errors = resume_errors({name: (lambda wnids=wnids: _trainer(root, max_steps=1, wnids=wnids))
                            for name, wnids in (("swapped", swapped), ("renamed", WNIDS[:6] + ["n99999999"]),
                                                ("same", WNIDS))})
    return stored, errors


@pytest.mark.timeout(120)
def test_the_checkpoint_stores_its_class_list_and_resume_refuses_another_order(tmp_path):
    stored, errors = run_ranks(_class_lists, 1, str(tmp_path))[0]
    assert stored == WNIDS
    assert "first at class index 0: the checkpoint has n00000000, this run n00000001" in errors["swapped"]
    assert "first at class index 6: the checkpoint has n00000006, this run n99999999" in errors["renamed"]
    assert errors["same"] is None


def test_class_list_checks_name_the_first_difference_and_accept_an_old_checkpoint_with_a_warning(tmp_path, caplog):
    meta = {"classes": ["a", "b", "c"]}
    with pytest.raises(checkpoint.CheckpointError, match="index 3: the checkpoint has no class .it has 3., this run d"):
        checkpoint.check_classes(str(tmp_path), meta, ["a", "b", "c", "d"])
    with pytest.raises(checkpoint.CheckpointError, match="index 2: the checkpoint has c, this run no class .it has 2."):
        checkpoint.check_classes(str(tmp_path), meta, ["a", "b"])
    with pytest.raises(checkpoint.CheckpointError, match="'classes' is not a list"):
        checkpoint.check_classes(str(tmp_path), {"classes": "abc"}, ["a", "b", "c"])
    checkpoint.check_classes(str(tmp_path), {}, ["b", "a"])  # saved before meta.json had classes: a warning
    assert "records no class list" in caplog.text
