"""`ShardedLinearCrossEntropy`: a classifier layer split by class over a process group, with its loss.

Rank r of P holds classes [start_r, end_r): the first `num_classes % P` ranks hold one extra class
(`shard_range`). Initialization depends only on (seed, global class id), so the shards of a P-rank
group are exactly the rows of the one-rank weight drawn after the same `torch.manual_seed`.
Beside the module: its gradient clipping over all shards (`clip_head_grad_`) and its top-k
prediction (`sharded_topk`); its checkpoint shards are in `megaclass.nn.checkpoint`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megaclass.ops import linear_cross_entropy, linear_cross_entropy_gathered
from megaclass.parallel import comm
from megaclass.seeding import derive_seed

_INIT_BLOCK = 4096
"""Rows drawn from one generator at initialization (any shard draws only the blocks it overlaps)."""


def shard_range(num_classes: int, rank: int, world: int) -> tuple[int, int]:
    """Classes [start, end) of `rank` in a group of `world`; the first `num_classes % world` hold one extra."""
    base, extra = divmod(num_classes, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class ShardedLinearCrossEntropy(nn.Module):
    """Linear classifier over `num_classes` classes split across `process_group`, fused with the
    sample-weighted softmax cross-entropy (`megaclass.ops.linear_cross_entropy`).

    weight: [C_local, in_features], this rank's classes [class_start, class_end); bias: [C_local] or None.
    process_group: None = the default group when torch.distributed is initialized, else one rank.
    softcap, z_loss: the op's options (`megaclass.ops.linear_cross_entropy`).
    class_weight: None, or [num_classes] per-class loss weights (F.cross_entropy(weight=)); the module keeps
    this rank's slice as a buffer that is not saved in the state dict (it is configuration, not state).
    Initialization: U(−1/√in_features, 1/√in_features) like `nn.Linear`, drawn per block of global rows
    from a seed taken from torch's default generator (ranks seeded alike get one consistent weight).
    """

    def __init__(self, in_features: int, num_classes: int, process_group=None, *, bias: bool = True,
                 ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                 chunk_size: int | None = None, softcap: float | None = None, z_loss: float = 0.0,
                 class_weight: torch.Tensor | None = None, device=None, dtype=None):
        super().__init__()
        if in_features <= 0 or num_classes <= 0:
            raise ValueError(f"in_features and num_classes must be positive, got {in_features}, {num_classes}")
        self.process_group = comm.default_group() if process_group is None else process_group
        self.world = comm.world_size(self.process_group) if self.process_group is not None else 1
        self.rank = comm.rank(self.process_group) if self.process_group is not None else 0
        self.in_features, self.num_classes = in_features, num_classes
        self.class_start, self.class_end = shard_range(num_classes, self.rank, self.world)
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.reduction, self.chunk_size = reduction, chunk_size
        self.softcap, self.z_loss = softcap, z_loss
        if class_weight is not None:
            if not isinstance(class_weight, torch.Tensor) or class_weight.shape != (num_classes,):
                raise ValueError(f"class_weight must be a tensor of shape [num_classes] = [{num_classes}] (the "
                                 f"module keeps this rank's slice), got {getattr(class_weight, 'shape', class_weight)}")
            class_weight = class_weight.detach()[self.class_start:self.class_end].to(device).contiguous()
        self.register_buffer("class_weight", class_weight, persistent=False)
        rows = self.class_end - self.class_start
        self.weight = nn.Parameter(torch.empty(rows, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(rows, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Redraw weight and bias; `seed` None takes one from torch's default generator."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        bound = 1.0 / math.sqrt(self.in_features)
        for name, param in (("weight", self.weight), ("bias", self.bias)):
            if param is None:
                continue
            width = self.in_features if name == "weight" else 1
            first, last = self.class_start // _INIT_BLOCK, (max(self.class_end, 1) - 1) // _INIT_BLOCK
            for block in range(first, last + 1):
                gen = torch.Generator().manual_seed(derive_seed(seed, f"head {name}", block))
                lo = block * _INIT_BLOCK
                hi = min(self.num_classes, lo + _INIT_BLOCK)
                values = torch.empty(hi - lo, width).uniform_(-bound, bound, generator=gen)
                a, b = max(lo, self.class_start), min(hi, self.class_end)
                if a < b:
                    param.view(-1, width)[a - self.class_start:b - self.class_start].copy_(values[a - lo:b - lo])

    def forward(self, features: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor | None = None,
                gather_input: bool = False, weight_grad_into: tuple | None = None, return_lse: bool = False):
        """features: [n, in_features]; target: [n] global class ids; sample_weight: [n] or None.

        gather_input=False: features/target/weights are the same on every rank (tensor parallel).
        gather_input=True: each rank brings its own n rows (data parallel); they are all-gathered into
        the global batch [P·n] and the loss is over that batch, identical on every rank
        (`linear_cross_entropy_gathered`: the features' gradient is summed over ranks exactly once, in
        the gather's reduce-scatter). sample_weight must not require grad in this mode.
        weight_grad_into: None, or (buffer [C_local, in_features], beta[, alpha]): weight's gradient is folded
        into buffer (beta·buffer + alpha·dW, e.g. an SGD momentum buffer) and weight.grad stays None
        (`megaclass.ops.linear_cross_entropy`).
        return_lse: True returns (loss, lse) with lse [rows] fp32, the log-sum-exp over all classes.
        """
        kwargs = dict(bias=self.bias, class_start=self.class_start, ignore_index=self.ignore_index,
                      label_smoothing=self.label_smoothing, reduction=self.reduction, chunk_size=self.chunk_size,
                      weight_grad_into=weight_grad_into, softcap=self.softcap, z_loss=self.z_loss,
                      class_weight=self.class_weight, return_lse=return_lse)
        if gather_input and self.world > 1:
            return linear_cross_entropy_gathered(features, self.weight, target, sample_weight,
                                                 process_group=self.process_group, **kwargs)
        return linear_cross_entropy(features, self.weight, target, sample_weight,
                                    process_group=self.process_group if self.world > 1 else None, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"classes=[{self.class_start}, {self.class_end}) of rank {self.rank}/{self.world}, "
                f"bias={self.bias is not None}, label_smoothing={self.label_smoothing}, softcap={self.softcap}, "
                f"z_loss={self.z_loss}, class_weight={self.class_weight is not None}")


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


@torch.no_grad()
def sharded_topk(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, class_start: int,
                 k: int, group=None, chunk_rows: int = 1024, labels: torch.Tensor | None = None):
    """Top-k softmax probabilities over the classes of all ranks.

    features: [n, D] identical on every rank of `group`; weight: [C_local, D] rows of classes
    [class_start, class_start + C_local). Returns (probs [n, k], classes [n, k]) on every rank, best
    first; with `labels` [n] (global class ids), also log p(label) [n] fp32, the label's log-softmax
    over all classes. Logits are formed a chunk of rows at a time; per rank only its top-k, its
    logsumexp and its label logits travel (an all-gather of [n, k] candidates), never [n, C]."""
    k_local = min(k, weight.shape[0])
    values, classes, lses, label_logits = [], [], [], []
    for lo in range(0, features.shape[0], chunk_rows):
        rows = features[lo:lo + chunk_rows]
        logits = torch.nn.functional.linear(rows.to(weight.dtype), weight, bias).float()
        lses.append(torch.logsumexp(logits, dim=1))
        v, i = logits.topk(k_local, dim=1)
        values.append(v)
        classes.append(i + class_start)
        if labels is not None:  # the rank that holds a row's label has its logit, the others -inf
            local = labels[lo:lo + chunk_rows].to(logits.device) - class_start
            mine = (local >= 0) & (local < weight.shape[0])
            z = logits.gather(1, local.clamp(0, weight.shape[0] - 1)[:, None]).squeeze(1)
            label_logits.append(torch.where(mine, z, torch.full_like(z, float("-inf"))))
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
    top = ((best_v - lse_global[:, None]).exp(), cand_c.gather(1, pos))
    if labels is None:
        return top
    z_label = comm.all_gather_stacked(torch.cat(label_logits), group).amax(dim=0)
    return (*top, z_label - lse_global)
