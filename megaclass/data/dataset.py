"""Images for training and evaluation, and a class-balanced sampler.

An image that exists but does not decode must not end a week-long run: `ImageDataset` counts it, logs
its path once, and serves the next readable item in its place (with that item's own label and index,
so per-sample weights stay aligned). With `preload`, such files are found up front. The same holds
for a decompression bomb (a header declaring more than PIL's `MAX_IMAGE_PIXELS` × 2) and for a path
that leaves the root (`megaclass.data.paths`), which is never opened.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from megaclass.data.decode import decode_image
from megaclass.data.paths import real_root, resolve_inside

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE = 64  # at or below this side, augment like CIFAR (pad + crop) rather than like ImageNet
SKIP_SLOTS = 64  # DataLoader workers with a skip counter of their own (more share one, modulo)


class _SmallImageTransform:
    """uint8 [3, s, s] -> normalized float32; when training, reflect-pad by s/8, random crop, random flip.

    Plain tensor ops: about 50× cheaper than a torchvision pipeline at 32×32, where that pipeline
    would cost more than the CNN step itself on a CPU.
    """

    def __init__(self, image_size: int, train: bool):
        self.size, self.train, self.pad = image_size, train, image_size // 8
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float().div_(255)
        if x.shape[-2:] != (self.size, self.size):
            x = torch.nn.functional.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                                                antialias=True, align_corners=False)[0]
        if self.train:
            x = torch.nn.functional.pad(x[None], (self.pad,) * 4, mode="reflect")[0]
            top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[:, top:top + self.size, left:left + self.size]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std


def _transform(image_size: int, train: bool):
    if image_size <= SMALL_IMAGE:
        return _SmallImageTransform(image_size, train)
    from torchvision.transforms import v2

    if train:
        steps = [v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(round(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ImageDataset(Dataset):
    """`items[i] = (path relative to root, label)` -> `(image: float32 [3, H, W], label: int, index: int)`.

    train: random crop + flip; otherwise a deterministic resize (and centre crop for large images).
    preload: decode every image once into memory (uint8, resized to `image_size`); for small data sets
    such as the synthetic one, where decoding would dominate a CPU training step.
    """

    def __init__(self, root: str | Path, items: Sequence[tuple[str, int]], image_size: int, train: bool,
                 preload: bool = False):
        self.root = Path(root)
        self._real_root = real_root(root)
        # a list is copied; another sequence (a shard split's columns) is kept, not made N tuples
        self.items = list(items) if isinstance(items, list) or not isinstance(items, Sequence) else items
        self.image_size = image_size
        self.train = train
        self.transform = _transform(image_size, train)
        self.unreadable: set[int] = set()
        self.skips = torch.zeros(1 + SKIP_SLOTS, dtype=torch.int64).share_memory_()
        """requests for an image that did not decode (another was served), one slot per DataLoader
        worker (0: this process), shared with the workers: `.sum()` is this process's count"""
        self._cache: list[torch.Tensor | None] | None = None
        if preload:
            self._cache = [self._decode(i) for i in range(len(self.items))]
            self.unreadable = {i for i, x in enumerate(self._cache) if x is None}
            if len(self.unreadable) == len(self.items) and self.items:
                raise RuntimeError(f"{self.root}: none of the {len(self.items)} images could be read")

    def __len__(self) -> int:
        return len(self.items)

    def _encoded(self, index: int) -> bytes | None:
        """The encoded image of item `index` (its file's bytes), or None (logged) when its path leaves the
        root. OSError: the file cannot be read."""
        relative = self.items[index][0]
        path = resolve_inside(self.root, relative, self._real_root)
        if path is None:
            log.warning("image outside the data root skipped (not opened): %s/%s", self.root, relative)
            return None
        with open(path, "rb") as f:
            return f.read()

    def _where(self, index: int) -> str:
        return str(self.root / self.items[index][0])

    def _decode(self, index: int) -> torch.Tensor | None:
        """uint8 [3, H, W], or None (logged) when the image cannot be read."""
        try:
            data = self._encoded(index)
        except OSError as exc:
            log.warning("unreadable image skipped: %s (%s: %s)", self._where(index), type(exc).__name__, exc)
            return None
        image = None if data is None else decode_image(data, self._where(index))
        size = (self.image_size, self.image_size)
        if image is not None and self.image_size <= SMALL_IMAGE and image.shape[1:] != size:
            # keeps a preloaded cache small; PIL's bilinear resize, as before decode_image: the same pixels
            from PIL import Image

            small = Image.fromarray(image.permute(1, 2, 0).numpy()).resize(size, Image.BILINEAR)
            image = torch.from_numpy(np.asarray(small, dtype=np.uint8).copy()).permute(2, 0, 1)
        return image

    def __getitem__(self, index: int):
        for step in range(len(self.items)):
            i = (index + step) % len(self.items)
            if i in self.unreadable:
                continue
            image = self._cache[i] if self._cache is not None else self._decode(i)
            if image is None:
                self.unreadable.add(i)
                continue
            if i != index:
                worker = get_worker_info()
                self.skips[0 if worker is None else 1 + worker.id % SKIP_SLOTS] += 1
            return self.transform(image), self.items[i][1], i
        raise RuntimeError(f"{self.root}: no readable image left among {len(self.items)}")


class ClassBalancedSampler(Sampler[int]):
    """Each draw picks a class uniformly, then one of its images uniformly (with replacement).

    labels: [N] class of each item. num_samples: draws per epoch (default N). The sequence is a
    function of (seed, epoch) alone, so every rank draws the same global order without communicating
    and takes its own rows of it (the engine's `RankBatches`). Call `set_epoch` each epoch.
    """

    def __init__(self, labels: Sequence[int], num_samples: int | None = None, seed: int = 0):
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError("ClassBalancedSampler needs a non-empty 1-D list of labels")
        order = np.argsort(labels, kind="stable")
        _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        self._order, self._starts, self._counts = order, starts, counts
        self.num_samples = num_samples or labels.size
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        cls = rng.integers(len(self._counts), size=self.num_samples)
        within = (rng.random(self.num_samples) * self._counts[cls]).astype(np.int64)
        return iter(self._order[self._starts[cls] + within].tolist())
