"""Atomic checkpoints: the DeepSpeed engine's checkpoint plus the class-sharded head.

Layout of `run_dir/checkpoints/`:

    step-00000120/ds/...                    DeepSpeed's files (engine.save_checkpoint, tag "ds")
    step-00000120/head/shard-00000.pt       rank r's head rows [start, end) + their optimizer state
    step-00000120/meta.json                 step, world size, class count
    latest                                  "step-00000120", replaced last

A save writes everything into `.tmp-step-…/`, and only when every rank has finished does rank 0
rename it to `step-…/` and then replace `latest`. A save killed at any point therefore leaves
`latest` naming the previous, complete checkpoint. Saving a step that already has a folder first
moves the old folder to `.old-step-…/`; if the save dies before the new folder takes its place,
`latest_checkpoint` falls back to that old folder. Every rank writes into the same folder, so
`run_dir` must be on a file system all nodes share.

Head shards re-shard on load (see `megaclass.nn.checkpoint.load_head_shard`), so a run can resume on another number of
ranks; the backbone's DeepSpeed checkpoint is world-size independent only at ZeRO stage 0, so `load`
refuses other stages at a new world size (convert with DeepSpeed's universal checkpoints first).
"""
from __future__ import annotations

import json
import os
import shutil

from megaclass.nn.checkpoint import head_shard_state, load_head_shard, save_head_shard
from megaclass.io import atomic_write_text, replace_folder
from megaclass.parallel import comm

LATEST = "latest"
OLD = ".old-"


def latest_checkpoint(root: str) -> str | None:
    """The folder `latest` names, or None when there is no complete checkpoint."""
    pointer = os.path.join(root, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        tag = f.read().strip()
    folder = os.path.join(root, tag)
    if os.path.isfile(os.path.join(folder, "meta.json")):
        return folder
    old = os.path.join(root, OLD + tag)  # a re-save of this step died between its two renames
    if os.path.isfile(os.path.join(old, "meta.json")):
        return old
    raise FileNotFoundError(f"{pointer} names {tag!r}, but {folder}/meta.json is missing")


def save(root: str, step: int, engine, head, head_optimizer, class_range, num_classes: int,
         writer: bool, keep: int = 2, extra_meta: dict | None = None) -> str:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    tag = f"step-{step:08d}"
    final, tmp = os.path.join(root, tag), os.path.join(root, f".tmp-{tag}")
    if writer:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    comm.barrier()
    engine.save_checkpoint(tmp, tag="ds", client_state={"step": step}, save_latest=False)
    if head is not None:  # pipeline mode: only the last stage holds the head
        state = head_shard_state(head, head_optimizer, class_range, num_classes)
        save_head_shard(os.path.join(tmp, "head", f"shard-{class_range[0]:09d}.pt"), state)
    comm.barrier()
    if writer:
        meta = {"step": step, "world_size": comm.world_size(), "zero_stage": engine.zero_optimization_stage(),
                "num_classes": num_classes, **(extra_meta or {})}
        atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
        old = os.path.join(root, OLD + tag)
        if os.path.exists(final):  # `latest` may name it: keep it (as `old`) until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        replace_folder(tmp, final)  # durable before `latest` names it
        atomic_write_text(os.path.join(root, LATEST), tag)
        shutil.rmtree(old, ignore_errors=True)
        _prune(root, keep)
    comm.barrier()
    return final


def _prune(root: str, keep: int) -> None:
    tags = sorted(t for t in os.listdir(root) if t.startswith("step-"))
    for tag in tags[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
    for name in os.listdir(root):
        if name.startswith(".tmp-") or (name.startswith(OLD) and os.path.isdir(os.path.join(root, name[len(OLD):]))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load(folder: str, engine, head, head_optimizer, class_range, num_classes: int) -> int:
    """Collective: restore the engine and this rank's head rows from `folder`; returns the step."""
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    if meta["num_classes"] != num_classes:
        raise ValueError(f"{folder}: checkpoint has {meta['num_classes']} classes, this run {num_classes}")
    same_world = meta["world_size"] == comm.world_size()
    zero_stage = meta.get("zero_stage", engine.zero_optimization_stage())
    if not same_world and max(zero_stage, engine.zero_optimization_stage()) > 0:
        raise ValueError(
            f"{folder}: saved by {meta['world_size']} ranks with ZeRO stage {zero_stage}, resumed by {comm.world_size()} "
            f"ranks with ZeRO stage {engine.zero_optimization_stage()}: ZeRO's partitioned checkpoints only load at the "
            f"world size that wrote them. Resume with {meta['world_size']} ranks, or convert {folder}/ds to a DeepSpeed "
            f"universal checkpoint (python -m deepspeed.checkpoint.ds_to_universal) and load that with "
            f"checkpoint.load_universal in the deepspeed config")
    path, client = engine.load_checkpoint(folder, tag="ds", load_optimizer_states=same_world,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{folder}/ds: DeepSpeed found no checkpoint to load")
    if head is not None:
        load_head_shard(os.path.join(folder, "head"), head, head_optimizer, class_range, num_classes)
    return int(client["step"])
