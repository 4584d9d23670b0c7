"""Backbones (timm, offline) and their pipeline-stage layer lists."""
from megaclass.models.backbones import SEED_MODELS, SMALL_MODELS, build_backbone

__all__ = ["SEED_MODELS", "SMALL_MODELS", "build_backbone"]
