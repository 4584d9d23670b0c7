"""Checkpoint shards of a `ShardedLinearCrossEntropy` and its optimizer state, re-shardable on load
to another number of ranks: one file per rank, `shard-<class_start>.pt`, holding its rows
[class_start, class_end), their optimizer state keyed by parameter name, and the names of the state
tensors that are per-row (`per_row`), so that loading slices exactly those.
"""
from __future__ import annotations

import glob
import os

import torch
from torch import nn

from megaclass.io import atomic_output, torch_save


def _head_params(head: nn.Module) -> dict[str, torch.Tensor]:
    params = {"weight": head.weight}
    if getattr(head, "bias", None) is not None:
        params["bias"] = head.bias
    return params


def _on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the CPU without a copy where it already is one whole tensor there (torch.save writes
    a view's entire storage, so a view is copied). A CPU head shard is hundreds of MB: no clone."""
    tensor = tensor.detach().cpu()
    whole = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole else tensor.clone()


def head_shard_state(head: nn.Module, optimizer: torch.optim.Optimizer, class_range: tuple[int, int],
                     num_classes: int) -> dict:
    """This rank's head rows and their optimizer state, keyed by parameter name (not position). CPU
    tensors are the live ones, not copies: save the state before the next step changes them."""
    params = _head_params(head)
    index = {id(p): name for name, p in params.items()}
    optim_state = {index[id(p)]: {k: (_on_cpu(v) if torch.is_tensor(v) else v) for k, v in optimizer.state[p].items()}
                   for group in optimizer.param_groups for p in group["params"] if id(p) in index and p in optimizer.state}
    # per-row: a state tensor shaped like its parameter (SGD's momentum, Adam's moments), sliced on re-sharding;
    # everything else (Adam's step) is copied whole
    per_row = {name: sorted(k for k, v in optimizer.state[params[name]].items()
                            if torch.is_tensor(v) and v.shape == params[name].shape) for name in optim_state}
    return {"class_start": class_range[0], "class_end": class_range[1], "num_classes": num_classes,
            "params": {k: _on_cpu(v) for k, v in params.items()}, "optim": optim_state, "per_row": per_row}


def save_head_shard(path: str, state: dict) -> None:
    """Atomically; creates the folder, so every rank can write without waiting for another to make it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_output(path) as tmp:
        torch_save(state, tmp)


def load_head_shard(folder: str, head: nn.Module, optimizer: torch.optim.Optimizer | None,
                    class_range: tuple[int, int], num_classes: int) -> None:
    """Fill this rank's rows [start, end) from the shard files in `folder`, whatever number of ranks
    wrote them: every file whose class range overlaps ours contributes its overlap (re-sharding)."""
    start, end = class_range
    files = sorted(glob.glob(os.path.join(folder, "shard-*.pt")))
    if not files:
        raise FileNotFoundError(f"no head shards (shard-*.pt) in {folder}")
    params = _head_params(head)
    filled = torch.zeros(end - start, dtype=torch.bool)
    optim_rows: dict[str, dict[str, torch.Tensor]] = {}
    optim_scalars: dict[str, dict] = {}
    for path in files:
        # memory-mapped: only the overlapping rows are read, and no whole shard is copied into memory
        shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if shard["num_classes"] != num_classes:
            raise ValueError(f"{path}: head has {shard['num_classes']} classes, this run {num_classes}")
        lo, hi = max(start, shard["class_start"]), min(end, shard["class_end"])
        if lo >= hi:
            continue
        src = slice(lo - shard["class_start"], hi - shard["class_start"])
        dst = slice(lo - start, hi - start)
        n_src = shard["class_end"] - shard["class_start"]
        per_row = shard.get("per_row")  # absent in checkpoints written before it was recorded: by first dimension
        for name, param in params.items():
            if name not in shard["params"]:
                raise ValueError(f"{path}: head checkpoint has no {name!r} (head.bias differs from the saved run?)")
            with torch.no_grad():
                param[dst].copy_(shard["params"][name][src])
            for key, value in shard["optim"].get(name, {}).items():
                if (key in per_row.get(name, ()) if per_row is not None else
                        torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == n_src):
                    buf = optim_rows.setdefault(name, {}).setdefault(
                        key, torch.zeros((end - start, *value.shape[1:]), dtype=value.dtype))
                    buf[dst] = value[src]
                else:  # e.g. Adam's step: a copy, so the state outlives the mapped file
                    optim_scalars.setdefault(name, {})[key] = value.clone() if torch.is_tensor(value) else value
        filled[dst] = True
    if not bool(filled.all()):
        missing = int((~filled).nonzero()[0]) + start
        raise ValueError(f"{folder}: the head shards do not cover class {missing}")
    if optimizer is not None:
        for name, param in params.items():
            state = dict(optim_scalars.get(name, {}))
            state.update({k: v.to(param.device) for k, v in optim_rows.get(name, {}).items()})
            if state:
                optimizer.state[param] = state
