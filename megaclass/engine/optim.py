"""Optimizers and the learning-rate schedule, shared by the backbone engine and the sharded head."""
from __future__ import annotations

import math

import torch

from megaclass.engine.config import ConfigError, OptimConfig

ALTERNATIVES = ("deepspeed_lamb (DeepSpeed's FusedLamb, CUDA), deepspeed_adam (DeepSpeed's FusedAdam/CPU Adam), "
                "adamw, adam, sgd (torch.optim)")


class InPlaceSGD(torch.optim.SGD):
    """`torch.optim.SGD` (the same hyperparameters, state and arithmetic, bit for bit) that updates in
    place and consumes the gradients: `step()` adds the weight decay into `p.grad`, makes the first
    step's gradient the momentum buffer instead of cloning it, and leaves `p.grad` None.

    torch's step makes `grad + wd·p` out of place and clones the first gradient into the buffer, each a
    transient the size of the parameter; for a class-sharded head (100,000 × 512 fp32 per rank at
    200,000 classes: 205 MB) that is a third of its training memory. Use it where nothing else reads
    the gradients after the step (the head's trainer zeroes them right after).

    Gradient folding (`fold_target`): a layer that can write its weight's gradient into a buffer
    (`linear_cross_entropy(..., weight_grad_into=...)`) writes it straight into the momentum buffer,
    buf ← μ·buf + g, and the step then does only buf += wd·p; p −= lr·buf: no gradient tensor at all.
    That is torch's arithmetic (d = g + wd·p; buf = μ·buf + d) associated differently: equal up to
    fp32 rounding, not bit for bit. The state (the momentum buffer) is the same, so checkpoints are too."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=False)
        self._folded: set[torch.Tensor] = set()  # parameters whose gradient went into the buffer this step

    def fold_target(self, p: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """(buffer, beta) for the next gradient of `p` to be folded into as buffer ← beta·buffer + g, or
        None where its group cannot fold (momentum 0, dampening, nesterov or maximize). beta is μ on the
        first call after a step (0 with a new zero buffer: torch's first step sets buf = d) and 1 on
        later ones (gradient accumulation). Call it only for a gradient that will be made: the next
        `step()` treats p as folded."""
        group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
        if group is None:
            raise ValueError(f"fold_target: a tensor of shape {list(p.shape)} that this optimizer does not update")
        if group["momentum"] == 0 or group["dampening"] != 0 or group["nesterov"] or group["maximize"]:
            return None
        state = self.state[p]
        if p in self._folded:
            return state["momentum_buffer"], 1.0
        self._folded.add(p)
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            return state["momentum_buffer"], 0.0
        return state["momentum_buffer"], group["momentum"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                grad = p.grad
                if p in self._folded:
                    self._step_folded(p, lr, wd)
                    continue
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("InPlaceSGD does not support sparse gradients; use torch.optim.SGD")
                if group["maximize"]:
                    grad.neg_()
                if wd != 0:
                    grad.add_(p, alpha=wd)
                update = grad
                if momentum != 0:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        # torch clones; the gradient is ours to keep (nesterov reads both below: clone)
                        buf = grad.clone() if group["nesterov"] else grad
                        self.state[p]["momentum_buffer"] = buf
                    else:
                        buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
                    update = grad.add_(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(update, alpha=-lr)
                p.grad = None  # consumed (and maybe now the momentum buffer): never zero it in place
        self._folded.clear()
        return loss

    def _step_folded(self, p: torch.Tensor, lr: float, wd: float) -> None:
        """The step of a parameter whose gradient is already in its buffer (μ·buf + g)."""
        buf = self.state[p]["momentum_buffer"]
        if p.grad is not None:  # a gradient that came by autograd besides the folded one
            buf.add_(p.grad)
            p.grad = None
        if wd != 0:
            buf.add_(p, alpha=wd)
        p.add_(buf, alpha=-lr)


def build_optimizer(params, cfg: OptimConfig, lr: float, in_place: bool = False) -> torch.optim.Optimizer:
    """`in_place`: SGD as `InPlaceSGD` (its step consumes the gradients)."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        sgd = InPlaceSGD if in_place else torch.optim.SGD
        return sgd(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "deepspeed_adam":
        if params and params[0].device.type == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam as Adam
        else:
            from deepspeed.ops.adam import FusedAdam as Adam
        return Adam(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, adamw_mode=True)
    if cfg.name == "deepspeed_lamb":
        from deepspeed.ops.lamb import FusedLamb

        return FusedLamb(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "apex_fused_lamb":
        try:
            from apex.optimizers import FusedLAMB
        except ImportError:
            raise ConfigError(f"optim.name: apex_fused_lamb needs NVIDIA apex, which is not installed; install apex "
                              f"or choose one of: {ALTERNATIVES}") from None
        return FusedLAMB(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise ConfigError(f"optim.name: unknown optimizer {cfg.name!r}")


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Linear warm-up over `warmup_steps`, then cosine to 0 at `total_steps` (or constant)."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
