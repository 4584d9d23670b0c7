"""Shared by the engine/train tests: a tiny WebVision-layout data set, tiny backbones, in-memory data."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331"]


def write_webvision(root: str, classes: int = 4, per_class: int = 16, val_per_class: int = 4, size: int = 16,
                    seed: int = 0) -> str:
    """A WebVision-layout folder: class c's images are noise around a per-class colour, so a model can learn."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "info"), exist_ok=True)
    colours = rng.integers(0, 256, size=(classes, 3))
    with open(os.path.join(root, "info", "synsets.txt"), "w") as f:
        f.writelines(f"{w} class {i}\n" for i, w in enumerate(WNIDS[:classes]))

    def image(path, c):
        pixels = np.clip(colours[c] + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(pixels).save(path, quality=95)

    lines = []
    for c in range(classes):
        for i in range(per_class):
            rel = f"google/q{c + 1:04d}/{c}_{i}.jpg"
            image(os.path.join(root, rel), c)
            lines.append(f"{rel} {c}\n")
    with open(os.path.join(root, "info", "train_filelist_google.txt"), "w") as f:
        f.writelines(lines)
    val = []
    for c in range(classes):
        for i in range(val_per_class):
            image(os.path.join(root, "val_images_256", f"val_{c}_{i}.jpg"), c)
            val.append(f"val_{c}_{i}.jpg {c}\n")
    with open(os.path.join(root, "info", "val_filelist.txt"), "w") as f:
        f.writelines(val)
    return root


class FlatLinear(nn.Module):
    """images [n, 3, H, W] -> features [n, num_features]; no batch norm, so that data-parallel training
    equals one process on the whole batch exactly (BatchNorm statistics are per rank)."""

    def __init__(self, in_features: int, num_features: int, dropout: float = 0.0):
        super().__init__()
        self.num_features = num_features
        self.proj = nn.Linear(in_features, num_features)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(torch.tanh(self.proj(x.flatten(1))))


class TensorItems(Dataset):
    """(image, label, index) from in-memory tensors."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i]), i


def random_items(n: int, classes: int, shape=(3, 4, 4), seed: int = 0) -> TensorItems:
    g = torch.Generator().manual_seed(seed)
    return TensorItems(torch.randn(n, *shape, generator=g), torch.randint(classes, (n,), generator=g))


def resume_errors(trainers: dict) -> dict:
    """{name: make_trainer} -> {name: the CheckpointError message of that trainer's resume, or None}."""
    from megaclass.engine import checkpoint

    errors = {}
    for name, make in trainers.items():
        t = make()
        try:
            t.resume()
            errors[name] = None
        except checkpoint.CheckpointError as exc:
            errors[name] = str(exc)
        t.close()
    return errors
