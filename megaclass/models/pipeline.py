"""A backbone as a list of DeepSpeed `LayerSpec`s, so that each pipeline stage builds only its layers.

timm's ResNet family (ResNet, ResNeXt, SE-ResNeXt) and its legacy SENet run their top-level children
in order: stem, stages, global pool (which flattens when the classifier is removed). Each child
becomes one `LayerSpec(BackbonePart, name, child)`. A part builds the whole model from the same
seed and keeps only its child, so every stage sees the same initialization as a one-stage run; the
built model is cached per process and dropped once the pipeline is built (`release_cache`).
"""
from __future__ import annotations

import functools

import torch
from deepspeed.pipe import LayerSpec
from torch import nn

from megaclass.models.backbones import CLASSIFIER_NAMES, build_backbone, create


@functools.lru_cache(maxsize=1)
def _whole(name: str, checkpoint: str | None, seed: int) -> nn.Module:
    return build_backbone(name, checkpoint, seed=seed)


def release_cache() -> None:
    _whole.cache_clear()


class BackbonePart(nn.Module):
    """One top-level child of the backbone `name` (built with `seed`)."""

    def __init__(self, name: str, child: str, seed: int, checkpoint: str | None = None):
        super().__init__()
        self.part = getattr(_whole(name, checkpoint, seed), child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.part(x)


def sequential_children(name: str) -> list[str]:
    """The names of the children that, run in order, compute the pooled features of `name`."""
    with torch.device("meta"):  # structure only: no memory, no initialization
        model = create(name)
    children = [n for n, _ in model.named_children() if n not in CLASSIFIER_NAMES]
    if "global_pool" not in children or children[-1] != "global_pool":
        raise ValueError(f"model.name: {name!r} cannot be split into pipeline stages (its children do not end in a "
                         "global pool); use a ResNet/ResNeXt/SE-ResNeXt/SENet model")
    return children


def layer_specs(name: str, seed: int, checkpoint: str | None = None) -> list[LayerSpec]:
    """images [B, 3, H, W] -> features [B, num_features], as pipeline layers (model.drop_rate's dropout is
    the trainer's, on the last stage)."""
    return [LayerSpec(BackbonePart, name, child, seed, checkpoint) for child in sequential_children(name)]
