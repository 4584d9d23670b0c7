"""Backbones: timm models built offline (no pretrained download), as feature extractors.

`build_backbone(cfg)` returns a module mapping images `[B, 3, H, W]` to pooled features
`[B, num_features]` (timm's classifier removed: the class-sharded head replaces it). Besides any
timm name (the seed's `resnext101_32x8d`, `seresnext101_32x4d`, `legacy_senet154`), a few small
ResNets for CPU runs are built from timm's `ResNet` class with narrow channels.
"""
from __future__ import annotations

import os

import timm
import torch
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

# name -> timm ResNet arguments: narrow BasicBlock ResNets that train in minutes on CPU cores.
SMALL_MODELS = {
    "resnet_tiny": dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16),
    "resnet_small": dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_width=32),
}
SEED_MODELS = ("resnext101_32x8d", "seresnext101_32x4d", "legacy_senet154")
CLASSIFIER_NAMES = ("fc", "last_linear", "classifier", "head")


def check_model_name(name: str) -> None:
    """Raise ValueError (naming model.name) unless `name` is a small model or a timm model."""
    if name not in SMALL_MODELS and not timm.is_model(name):
        raise ValueError(f"model.name: unknown model {name!r}; use a timm model name (e.g. {', '.join(SEED_MODELS)}) "
                         f"or one of {', '.join(SMALL_MODELS)}")


def create(name: str) -> nn.Module:
    """The model with its classifier removed (`num_classes=0`); `.num_features` is the feature width. No
    dropout of timm's (`drop_rate`): the trainer applies model.drop_rate to the features, keyed per image."""
    if name in SMALL_MODELS:
        return ResNet(**SMALL_MODELS[name], num_classes=0)
    check_model_name(name)
    return timm.create_model(name, pretrained=False, num_classes=0)


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a local backbone checkpoint: a state dict, or a dict holding one under state_dict/model/module.
    Classifier weights in it are dropped (the sharded head replaces the classifier)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.checkpoint: no such file: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"model.checkpoint: {path} holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k.split(".")[0] not in CLASSIFIER_NAMES}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise ValueError(f"model.checkpoint: {path} does not fit the model: {first}") from None
    if missing or unexpected:
        raise ValueError(f"model.checkpoint: {path} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def build_backbone(name: str, checkpoint: str | None = None, seed: int | None = None) -> nn.Module:
    """images [B, 3, H, W] -> features [B, model.num_features]; `seed` fixes the initialization
    without touching the global random state."""
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        model = create(name)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model
