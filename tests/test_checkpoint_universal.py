"""Resuming at another world size at every ZeRO stage (DeepSpeed's universal checkpoint for ZeRO 1-3):
the first loss after resume is the loss the saved model gives on that batch, and the second shows that the
optimizer state came along.

Reference: the run that saved the checkpoint went on without stopping. Both worlds use the same global
batch (2 ranks × 3 images, 3 ranks × 2), whose images do not depend on the world size (`RankBatches`),
so the uninterrupted run's steps 3 and 4 see the same batches as the resumed run's first two steps, from
the same saved state. They differ only in the order of float sums (gloo all-reduces of 2 or 3 parts, the
head's classes in 2 or 3 shards): hence a tolerance, not equality. Losing the optimizer state changes
the second step's loss by far more than the tolerance (docs/faults.md gives both figures).
"""
import json
import os
import shutil

import pytest
import torch
from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO
from dist_utils import run_ranks
from engine_helpers import FlatLinear, random_items, resume_errors

from megaclass.engine import checkpoint
from megaclass.engine.config import config_from_dict
from megaclass.engine.trainer import TrainData, Trainer
from megaclass.parallel import comm

N, CLASSES, GLOBAL_BATCH = 24, 7, 6
# fp32: float sums in another order, measured up to 7e-8. bf16: the backbone's gradients are summed over
# the ranks in bf16 (unit roundoff 2^-8), so 2 and 3 ranks round them differently: measured up to 4e-4 at
# the second step, where two uninterrupted runs of 2 and 3 ranks already differ by 1.4e-4 (docs/faults.md)
RTOL = {"fp32": 1e-5, "bf16": 2e-3}
OPTIMS = {"adamw": {"name": "adamw", "lr": 0.02, "weight_decay": 0.01},
          "sgd": {"name": "sgd", "lr": 0.3, "momentum": 0.9, "weight_decay": 1e-4}}
# (ZeRO stage, optimizer[-precision]): the shipped configs train with SGD in bf16 at ZeRO 1 and 2; stage 0
# keeps whole replicas (no conversion)
CASES = [(0, "sgd"), (1, "adamw"), (1, "sgd"), (1, "sgd-bf16"), (2, "adamw"), (3, "adamw"), (3, "sgd")]


def _trainer(run_dir, world, stage, optim, max_steps=4):
    optim, _, precision = optim.partition("-")
    cfg = config_from_dict({
        "run_dir": run_dir, "head": {"bias": True}, "data": {"num_workers": 0},
        "parallel": {"zero_stage": stage, "precision": precision or "fp32"},
        "optim": {**OPTIMS[optim], "warmup_steps": 1, "schedule": "cosine"},
        "train": {"micro_batch_size": GLOBAL_BATCH // world, "epochs": 1, "max_steps": max_steps,
                  "save_every": 2, "progress": False},
    })
    items = random_items(N, CLASSES)
    torch.manual_seed(0)
    return Trainer(cfg, TrainData(items, CLASSES, items.labels, torch.linspace(0.2, 1.5, N)), backbone=FlatLinear(48, 8))


def _fit(run_dir, world, stage, optim):
    t = _trainer(run_dir, world, stage, optim)
    losses = {r["step"]: r["loss"] for r in t.fit()}
    t.close()
    return losses


def _copy_checkpoint(src_run, dst_run, step=2):
    """`dst_run/checkpoints` with `src_run`'s checkpoint of `step` as its latest (rank 0 copies)."""
    if comm.rank() == 0:
        tag = f"step-{step:08d}"
        shutil.copytree(f"{src_run}/checkpoints/{tag}", f"{dst_run}/checkpoints/{tag}")
        with open(f"{dst_run}/checkpoints/latest", "w") as f:
            f.write(tag)
    comm.barrier()


def _name(stage, optim, world):
    return f"z{stage}-{optim}-w{world}"


def _train_all(rank, world, root):
    os.environ["LOCAL_RANK"] = str(rank)
    return {(s, o): _fit(f"{root}/{_name(s, o, world)}", world, s, o) for s, o in CASES}


def _resume_all(rank, world, root, from_world, src_root=None):
    """Each case's step-2 checkpoint of `from_world` ranks (in `src_root`, default `root`), resumed here to step 4."""
    os.environ["LOCAL_RANK"] = str(rank)
    out = {}
    for stage, optim in CASES:
        name = _name(stage, optim, from_world)
        src, dst = f"{src_root or root}/{name}", f"{root}/{name}-to-{world}"
        _copy_checkpoint(src, dst)
        if rank == 0 and (stage, optim) == (1, "sgd"):  # a conversion that died before its rename
            os.makedirs(f"{dst}/checkpoints/step-00000002/.tmp-universal/ds")
        out[(stage, optim)] = _fit(dst, world, stage, optim)
    return out


def _forgetting_the_optimizer_state(rank, world, root):
    """The same resumes, but the backbone's optimizer state dropped after the load: how much the second
    step's loss depends on it (that the comparison can see a lost state)."""
    real_load = checkpoint.load

    def forgetful(folder, engine, *args, **kwargs):
        step = real_load(folder, engine, *args, **kwargs)
        getattr(engine.optimizer, "optimizer", engine.optimizer).state.clear()  # ZeRO wraps the torch optimizer
        return step

    checkpoint.load = forgetful
    try:
        return _resume_all(rank, world, f"{root}/forgotten", 2, src_root=root)
    finally:
        checkpoint.load = real_load


def _resume_and_forget(rank, world, root):
    return _resume_all(rank, world, root, 2), _forgetting_the_optimizer_state(rank, world, root)


def _train_then_resume(rank, world, root):
    return _resume_all(rank, world, root, from_world=3), _train_all(rank, world, root)


def _errors(rank, world, root):
    """A checkpoint DeepSpeed cannot convert, and a ZeRO stage change with the world size; and one saved
    before megaclass described it for the converter, which converts all the same."""
    os.environ["LOCAL_RANK"] = str(rank)
    src, bad, old = f"{root}/{_name(1, 'adamw', 2)}", f"{root}/damaged", f"{root}/old"
    _copy_checkpoint(src, bad)
    _copy_checkpoint(src, old)
    model_states = f"{old}/checkpoints/step-00000002/ds/mp_rank_00_model_states.pt"
    described = UNIVERSAL_CHECKPOINT_INFO in torch.load(model_states, weights_only=False)
    comm.barrier()
    if rank == 0:
        state = torch.load(model_states, weights_only=False)
        del state[UNIVERSAL_CHECKPOINT_INFO]
        torch.save(state, model_states)
    if rank == 0:  # a complete torch.save file, but not an optimizer partition
        torch.save({"not": "an optimizer partition"}, f"{bad}/checkpoints/step-00000002/ds/"
                   "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    comm.barrier()
    errors = resume_errors({"damaged": lambda: _trainer(bad, world, 1, "adamw"),
                            "stage": lambda: _trainer(src, world, 2, "adamw")})
    t = _trainer(old, world, 1, "adamw")
    old_step = t.resume()
    t.close()
    return errors, described, old_step


def _rtol(optim):
    return RTOL["bf16" if optim.endswith("-bf16") else "fp32"]


def _compare(saved, resumed, case, label):
    """resumed[3], resumed[4] against the uninterrupted saved[3], saved[4]; returns the relative differences."""
    assert sorted(resumed) == [3, 4], label
    diffs = {}
    for step in (3, 4):
        diffs[step] = abs(resumed[step] - saved[step]) / abs(saved[step])
        assert diffs[step] <= _rtol(case[1]), f"{label} step {step}: resumed {resumed[step]!r}, uninterrupted {saved[step]!r}"
    return diffs


@pytest.mark.timeout(600)
def test_every_zero_stage_resumes_at_another_world_size_with_the_saved_models_losses(tmp_path):
    root = str(tmp_path)
    three = run_ranks(_train_all, 3, root)
    to_two, two = run_ranks(_train_then_resume, 2, root)[0]
    to_three, forgotten = run_ranks(_resume_and_forget, 3, root)[0]
    diffs, lost = {}, {}
    for case in CASES:
        diffs[(*case, "3->2")] = _compare(three[0][case], to_two[case], case, f"{case} 3 -> 2 ranks")
        diffs[(*case, "2->3")] = _compare(two[case], to_three[case], case, f"{case} 2 -> 3 ranks")
        lost[case] = abs(forgotten[case][4] - two[case][4]) / abs(two[case][4])
        assert forgotten[case][3] == to_three[case][3] and lost[case] > 5 * _rtol(case[1]), (case, lost[case])
    print("relative loss difference to the uninterrupted run (step 3, step 4):",
          {f"ZeRO {s} {o} {d}": (f"{v[3]:.1e}", f"{v[4]:.1e}") for (s, o, d), v in diffs.items()})
    print("step 4 with the backbone's optimizer state dropped:", {f"ZeRO {s} {o}": f"{v:.1e}" for (s, o), v in lost.items()})
    print("step 4 of the uninterrupted runs, 2 against 3 ranks:",
          {f"ZeRO {s} {o}": f"{abs(two[(s, o)][4] - three[0][(s, o)][4]) / abs(two[(s, o)][4]):.1e}" for s, o in CASES})
    for stage, optim in CASES:
        folder = tmp_path / f"{_name(stage, optim, 2)}-to-3/checkpoints/step-00000002"
        # converted once, beside the checkpoint, at ZeRO 1-3 only; the dead conversion's folder replaced
        assert (folder / "universal").is_dir() == (stage > 0) and not (folder / ".tmp-universal").exists()
        if stage in (1, 2) and optim == "sgd":
            states = sorted(p.name for p in (folder / "universal/ds/zero/proj.weight").iterdir())
            assert states == ["fp32.pt", "momentum_buffer.pt"]
        with open(tmp_path / f"{_name(stage, optim, 2)}-to-3/checkpoints/step-00000004/meta.json") as f:
            assert json.load(f)["world_size"] == 3  # saved again at its own world size


@pytest.mark.timeout(300)
def test_a_checkpoint_that_does_not_convert_or_another_zero_stage_is_refused_on_every_rank_an_old_one_converts(tmp_path):
    run_ranks(_fit_two_ranks_zero1, 2, str(tmp_path))
    got = run_ranks(_errors, 3, str(tmp_path))
    errors = [g[0] for g in got]
    assert errors[0] == errors[1] == errors[2]  # the same error on every rank, none left waiting
    damaged, stage = errors[0]["damaged"], errors[0]["stage"]
    assert all(described and old_step == 2 for _, described, old_step in got)
    assert "converting it to a DeepSpeed universal checkpoint (to resume at another world size) failed on rank 0" \
        in damaged and "KeyError: 'optimizer_state_dict'" in damaged and "damaged/checkpoints/step-00000002/ds" in damaged
    assert not os.path.exists(tmp_path / "damaged/checkpoints/step-00000002/.tmp-universal")
    assert "saved by 2 ranks with ZeRO stage 1, resumed by 3 ranks with ZeRO stage 2" in stage
    assert "same ZeRO stage only" in stage


def _fit_two_ranks_zero1(rank, world, root):
    os.environ["LOCAL_RANK"] = str(rank)
    _fit(f"{root}/{_name(1, 'adamw', 2)}", world, 1, "adamw")
