"""Optimizers and the learning-rate schedule, shared by the backbone engine and the sharded head."""
from __future__ import annotations

import math

import torch

from megaclass.engine.config import ConfigError, OptimConfig

ALTERNATIVES = ("deepspeed_lamb (DeepSpeed's FusedLamb, CUDA), deepspeed_adam (DeepSpeed's FusedAdam/CPU Adam), "
                "adamw, adam, sgd (torch.optim)")


def build_optimizer(params, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
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
