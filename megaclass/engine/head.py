"""The class-sharded classifier outside the DeepSpeed engine: its shard range, its optimizer-aware
checkpoint shards (re-shardable to another number of ranks), and sharded top-k prediction.

The head is kept out of the engine's module on purpose: DeepSpeed averages every gradient of its
module over the data-parallel group, but each rank's head rows are its own classes, so they must
never be averaged. Owning the head (and its optimizer) here keeps its optimizer state sharded by
construction.
"""
from __future__ import annotations

import glob
import os

import torch
from torch import nn

from megaclass.io import atomic_output
from megaclass.parallel import comm


def clip_head_grad_(head: nn.Module, max_norm: float, group=None) -> float:
    """Scale the head's gradients so that their norm over all shards of `group` is at most
    `max_norm`; returns that norm (the same on every rank)."""
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    square = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for g in grads:  # a norm reduction, not g.pow(2): no temporary the size of the head
        square += torch.linalg.vector_norm(g, dtype=torch.float32).square()
    norm = float(comm.all_reduce_(square, group).sqrt())
    if norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


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
    return {"class_start": class_range[0], "class_end": class_range[1], "num_classes": num_classes,
            "params": {k: _on_cpu(v) for k, v in params.items()}, "optim": optim_state}


def save_head_shard(path: str, state: dict) -> None:
    """Atomically; creates the folder, so every rank can write without waiting for another to make it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def _rows(tensor: torch.Tensor, num_rows: int) -> bool:
    return torch.is_tensor(tensor) and tensor.dim() >= 1 and tensor.shape[0] == num_rows


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
        for name, param in params.items():
            if name not in shard["params"]:
                raise ValueError(f"{path}: head checkpoint has no {name!r} (head.bias differs from the saved run?)")
            with torch.no_grad():
                param[dst].copy_(shard["params"][name][src])
            for key, value in shard["optim"].get(name, {}).items():
                if _rows(value, n_src):
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


@torch.no_grad()
def sharded_topk(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, class_start: int,
                 k: int, group=None, chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k softmax probabilities over the classes of all ranks.

    features: [n, D] identical on every rank of `group`; weight: [C_local, D] rows of classes
    [class_start, class_start + C_local). Returns (probs [n, k], classes [n, k]) on every rank, best
    first. Logits are formed a chunk of rows at a time; per rank only its top-k and its logsumexp
    travel (an all-gather of [n, k] candidates), never [n, C]."""
    k_local = min(k, weight.shape[0])
    values, classes, lses = [], [], []
    for rows in features.split(chunk_rows):
        logits = torch.nn.functional.linear(rows.to(weight.dtype), weight, bias).float()
        lses.append(torch.logsumexp(logits, dim=1))
        v, i = logits.topk(k_local, dim=1)
        values.append(v)
        classes.append(i + class_start)
    v, c, lse = torch.cat(values), torch.cat(classes), torch.cat(lses)
    if k_local < k:  # a rank with fewer than k classes pads with impossible candidates
        pad = k - k_local
        v = torch.cat([v, v.new_full((v.shape[0], pad), float("-inf"))], dim=1)
        c = torch.cat([c, c.new_full((c.shape[0], pad), -1)], dim=1)
    all_v = comm.all_gather_stacked(v, group)          # [P, n, k]
    all_c = comm.all_gather_stacked(c, group)
    all_lse = comm.all_gather_stacked(lse, group)      # [P, n]
    lse_global = torch.logsumexp(all_lse, dim=0)        # [n]
    cand_v = all_v.permute(1, 0, 2).reshape(v.shape[0], -1)
    cand_c = all_c.permute(1, 0, 2).reshape(v.shape[0], -1)
    best_v, pos = cand_v.topk(k, dim=1)
    return (best_v - lse_global[:, None]).exp(), cand_c.gather(1, pos)
