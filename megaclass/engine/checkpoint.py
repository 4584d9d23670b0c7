"""Atomic checkpoints: the DeepSpeed engine's checkpoint plus the class-sharded head.

Layout of `run_dir/checkpoints/`:

    step-00000120/ds/...                    DeepSpeed's files (engine.save_checkpoint, tag "ds")
    step-00000120/head/shard-00000.pt       rank r's head rows [start, end) + their optimizer state
    step-00000120/meta.json                 step, world size, class count
    latest                                  "step-00000120", replaced last

A save writes everything into `.tmp-step-…/`, and only when every rank has finished does rank 0
rename it to `step-…/` and then replace `latest`. A save killed at any point therefore leaves
`latest` naming the previous, complete checkpoint. Head shards re-shard on load (see
`head.load_head_shard`), so a run can resume on another number of ranks (the backbone then needs a
ZeRO stage whose DeepSpeed checkpoint is world-size independent: stage 0, or DeepSpeed's universal
checkpoints).
"""
from __future__ import annotations

import json
import os
import shutil

from megaclass.engine.head import head_shard_state, load_head_shard, save_head_shard
from megaclass.parallel import comm

LATEST = "latest"


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(root: str) -> str | None:
    """The folder `latest` names, or None when there is no complete checkpoint."""
    pointer = os.path.join(root, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        tag = f.read().strip()
    folder = os.path.join(root, tag)
    if not os.path.isfile(os.path.join(folder, "meta.json")):
        raise FileNotFoundError(f"{pointer} names {tag!r}, but {folder}/meta.json is missing")
    return folder


def save(root: str, step: int, engine, head, head_optimizer, class_range, num_classes: int,
         writer: bool, keep: int = 2, extra_meta: dict | None = None) -> str:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    tag = f"step-{step:08d}"
    final, tmp = os.path.join(root, tag), os.path.join(root, f".tmp-{tag}")
    if writer:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "head"))
    comm.barrier()
    engine.save_checkpoint(tmp, tag="ds", client_state={"step": step}, save_latest=False)
    if head is not None:  # pipeline mode: only the last stage holds the head
        state = head_shard_state(head, head_optimizer, class_range, num_classes)
        save_head_shard(os.path.join(tmp, "head", f"shard-{class_range[0]:09d}.pt"), state)
    comm.barrier()
    if writer:
        meta = {"step": step, "world_size": comm.world_size(), "num_classes": num_classes, **(extra_meta or {})}
        _write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text(os.path.join(root, LATEST), tag)
        _prune(root, keep)
    comm.barrier()
    return final


def _prune(root: str, keep: int) -> None:
    tags = sorted(t for t in os.listdir(root) if t.startswith("step-"))
    for tag in tags[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
    for tag in os.listdir(root):
        if tag.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, tag), ignore_errors=True)


def load(folder: str, engine, head, head_optimizer, class_range, num_classes: int) -> int:
    """Collective: restore the engine and this rank's head rows from `folder`; returns the step."""
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    if meta["num_classes"] != num_classes:
        raise ValueError(f"{folder}: checkpoint has {meta['num_classes']} classes, this run {num_classes}")
    same_world = meta["world_size"] == comm.world_size()
    path, client = engine.load_checkpoint(folder, tag="ds", load_optimizer_states=same_world,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{folder}/ds: DeepSpeed found no checkpoint to load")
    if head is not None:
        load_head_shard(os.path.join(folder, "head"), head, head_optimizer, class_range, num_classes)
    return int(client["step"])
