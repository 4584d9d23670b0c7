"""Feeding the ranks: which images each rank reads at each micro-step, repeatably.

Every epoch has one global order of training images (a permutation from (seed, epoch), or a
class-balanced draw). Micro-step `j` takes the next `P × micro_batch` images of that order and rank
`r` reads rows `[r·micro, (r+1)·micro)` of them, so the all-gathered features are exactly the
global batch a one-rank run would see. Augmentation is seeded per (seed, epoch, image), so a run
resumed mid-epoch (by skipping micro-steps, not images already loaded) reads the same pixels as one
that never stopped, with any number of DataLoader workers.

With `data.shards` the images are positions in tar shards (`megaclass.data.shards`) and the global
order of an epoch is a seeded shard order followed by a shuffle buffer; the rest is the same.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from megaclass.data import ClassBalancedSampler, ImageDataset, WebVision, load_webvision
from megaclass.data.columns import StringColumn, as_string_column, lookup
from megaclass.data.shards import ShardDataset, Shards, load_shards, shard_epoch_order, shard_order
from megaclass.seeding import derive_seed
from megaclass.weighting.tables import read_weight_column

if TYPE_CHECKING:
    from megaclass.engine.config import Config


def epoch_order(num_items: int, seed: int, epoch: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The global image order of `epoch`: a seeded permutation, or with `labels` the data package's
    class-balanced draw (a class uniformly, then one of its images uniformly)."""
    if labels is None:
        return torch.randperm(num_items, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch order", epoch)))
    sampler = ClassBalancedSampler(labels.tolist(), num_samples=num_items, seed=seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler))


def epoch_order_fn(dataset: Dataset, seed: int, labels: torch.Tensor | None = None, buffer: int = 10_000):
    """epoch -> the global order of that epoch over `dataset`: shards in a seeded order then a shuffle
    buffer of `buffer` samples for a `ShardDataset` (reads stay within a few shards), else `epoch_order`.
    `labels`: class-balanced instead (each path's own design, docs/data.md)."""
    if isinstance(dataset, ShardDataset):
        return lambda epoch: shard_epoch_order(dataset.sizes, seed, epoch, buffer, labels)
    n = len(dataset)
    return lambda epoch: epoch_order(n, seed, epoch, labels)


def prefetch_shards(dataset: Dataset, seed: int, epoch: int) -> None:
    """From a shard URL: start copying `dataset`'s tars into the node's cache, in the order `epoch` first
    reads them (nothing on files or a shard folder; elsewhere each tar is copied when first read)."""
    if isinstance(dataset, ShardDataset):
        dataset.prefetch(shard_order(len(dataset.sizes), seed, epoch))


def micro_batch_place(step: int, per_epoch: int, rank: int, world: int, micro: int) -> tuple[int, int]:
    """(epoch, row of that epoch's global order where rank `rank`'s micro-batch starts) at micro-step
    `step`, with `per_epoch` global batches of `world × micro` an epoch. The rank's images are that row
    and the `micro - 1` after it."""
    epoch, j = divmod(step, per_epoch)
    return epoch, (j * world + rank) * micro


def sample_keys(step: int, per_epoch: int, rank: int, world: int, micro: int) -> torch.Tensor:
    """[micro] int64: the place in the run of each image that rank `rank` reads at micro-step `step` of
    training (`RankBatches`): epoch · 2**32 + its row in the epoch's global order (at most 2**32 images an
    epoch). An image has the same key whatever the number of ranks and however the same global batch is
    split into micro-batches; model.drop_rate's masks are keyed by it (`megaclass.nn.row_seeded_dropout`)."""
    epoch, first = micro_batch_place(step, per_epoch, rank, world, micro)
    return torch.arange(first, first + micro) + (epoch << 32)


class RankBatches(Sampler):
    """Yields this rank's micro-batches as lists of (epoch, image index), from micro-step `start` on.

    Training (`order_fn` given): micro-steps run on across epochs; each epoch drops its last partial
    global batch. Prediction (`order_fn=None`): one pass over 0..num_items-1 in order, the last global
    batch padded with index -1 (the caller drops those rows)."""

    def __init__(self, num_items: int, rank: int, world: int, micro: int, total_micro_steps: int | None = None,
                 order_fn=None, start: int = 0):
        self.num_items, self.rank, self.world, self.micro = num_items, rank, world, micro
        self.order_fn, self.start = order_fn, start
        global_batch = world * micro
        if order_fn is None:
            self.per_epoch = math.ceil(num_items / global_batch)
            self.total = self.per_epoch
        else:
            self.per_epoch = num_items // global_batch
            if self.per_epoch == 0:
                raise ValueError(f"{num_items} training images cannot fill one global batch of {global_batch} "
                                 f"({world} ranks × train.micro_batch_size {micro}); lower train.micro_batch_size")
            self.total = total_micro_steps

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self):
        epoch, order = -1, None
        for step in range(self.start, self.total):
            e, first = micro_batch_place(step, self.per_epoch, self.rank, self.world, self.micro)
            if self.order_fn is None:
                yield [(0, i if i < self.num_items else -1) for i in range(first, first + self.micro)]
                continue
            if e != epoch:
                epoch, order = e, self.order_fn(e)
            yield [(e, int(i)) for i in order[first: first + self.micro]]


def skipped_samples(dataset: ImageDataset, device: torch.device | str = "cpu") -> int:
    """Collective: the requests for images of `dataset` that did not decode (skipped, another served),
    summed over the ranks."""
    from megaclass.parallel import comm

    count = dataset.skips.sum().reshape(1).to(device)
    return int(comm.all_reduce_(count))


class SeededItems(Dataset):
    """`dataset[(epoch, i)]` = `dataset[i]` drawn under a random state fixed by (seed, epoch, i); the
    caller's random state is left untouched. Index -1 (padding) returns item 0 with index -1. The
    index returned is the one the dataset served (it may skip an unreadable image)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            item_seed = derive_seed(self.seed, "augmentation", epoch, max(index, 0))
            torch.manual_seed(item_seed)
            state = random.getstate()
            random.seed(item_seed)
            try:
                image, label, served = self.dataset[max(index, 0)]
            finally:
                random.setstate(state)
        return image, label, served if index >= 0 else -1


class Subset(Dataset):
    """Items `indices` of `dataset` (which yields (image, label, index served)), numbered 0..n-1 so that
    the index it returns points into the subset, as the trainer's weights and predictions expect. Where
    the dataset serves another image in place of an unreadable one, the next readable item of the
    subset is served instead (the dataset's stand-in may lie outside it)."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor):
        self.dataset, self.indices = dataset, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        for step in range(len(self.indices)):
            k = (j + step) % len(self.indices)
            image, label, served = self.dataset[self.indices[k]]
            if served == self.indices[k]:
                return image, label, k
        raise RuntimeError(f"no readable image left among the {len(self.indices)} of this subset")


def read_weight_table(path: str, paths: StringColumn | Sequence[str], allow_extra: bool = False) -> torch.Tensor:
    """Per-image loss weights (`<image path>\t<weight>`, read by `megaclass.weighting`) in the order
    of `paths`, joined by path as hashed string columns (no str per image). Every training image needs
    a weight; a row naming an image outside the training set is an error (the weights were made for
    other data) unless `allow_extra` (a run on a subset)."""
    images, table = read_weight_column(path)
    paths = as_string_column(paths)
    row = lookup(images, paths)
    missing = np.flatnonzero(row < 0)
    if len(missing):
        raise ValueError(f"{path}: no weight for {len(missing)} training images, e.g. {paths[int(missing[0])]!r}")
    if not allow_extra and len(images) > len(paths):
        extra = int(np.argmax(lookup(paths, images) < 0))
        raise ValueError(f"{path}: image {images[extra]!r} is not in the training set")
    return torch.from_numpy(table[row].astype(np.float32))


@dataclass(slots=True)
class RunData:
    """A data set as the trainer reads it: from files (`webvision`) or from shards (`shards`)."""

    webvision: WebVision | None
    train: ImageDataset
    """training images with augmentation"""
    train_eval: ImageDataset
    """the same images without augmentation (predictions on the training set)"""
    val: ImageDataset
    labels: torch.Tensor
    """[N] training labels"""
    val_labels: torch.Tensor
    sample_weights: torch.Tensor | None
    """[N] loss weights, or None for all ones"""
    shards: Shards | None = None

    @property
    def paths(self) -> StringColumn | list[str]:
        """Each training image's key: its path relative to the data root (also on shards). On shards the
        index's string column itself, not a str per image (16M of those are GBs)."""
        if isinstance(self.train, ShardDataset):
            return self.train.columns.paths
        return [p for p, _ in self.train.items]

    @property
    def wnids(self) -> list[str]:
        return self.webvision.wnids if self.webvision is not None else self.shards.wnids

    @property
    def num_classes(self) -> int:
        return len(self.wnids)


def load_shard_data(cfg) -> RunData:
    """Everything `cfg.data` names, from the shard folder `cfg.data.shards`."""
    shards = load_shards(cfg.data.shards, cache=cfg.data.shard_cache)
    if cfg.data.limit_train:  # the first N positions, as the first N images on files
        shards.columns["train"] = shards.columns["train"].head(cfg.data.limit_train)
        left, sizes = len(shards.columns["train"]), []
        for size in shards.sizes["train"]:
            sizes.append(min(size, left))
            left -= sizes[-1]
        shards.sizes["train"] = [s for s in sizes if s]
    columns = shards.columns["train"]
    if not len(columns):
        raise ValueError(f"data.shards: {cfg.data.shards} has no training samples")
    small = cfg.data.image_size <= 64
    sets = [ShardDataset(shards, split, cfg.data.image_size, train=train, preload=small)
            for split, train in (("train", True), ("train", False), ("val", False))]
    sample_weights = (read_weight_table(cfg.data.weights, columns.paths, allow_extra=bool(cfg.data.limit_train))
                      if cfg.data.weights else None)
    return RunData(None, *sets, torch.from_numpy(columns.label), torch.from_numpy(shards.columns["val"].label),
                   sample_weights, shards)


def load_run_data(cfg) -> RunData:
    """Everything `cfg.data` names."""
    if cfg.data.shards:
        return load_shard_data(cfg)
    data = load_webvision(cfg.data.root)
    records = data.train[: cfg.data.limit_train] if cfg.data.limit_train else data.train
    items = [(r.path, r.label) for r in records]
    if not items:
        raise ValueError(f"data.root: {cfg.data.root} has no training images")
    small = cfg.data.image_size <= 64  # decode once: a small data set's steps would be JPEG-bound
    sets = [ImageDataset(cfg.data.root, its, cfg.data.image_size, train=train, preload=small)
            for its, train in ((items, True), (items, False), (data.val, False))]
    paths = [p for p, _ in items]
    sample_weights = (read_weight_table(cfg.data.weights, paths, allow_extra=bool(cfg.data.limit_train))
                      if cfg.data.weights else None)
    return RunData(data, *sets, torch.tensor([label for _, label in items]),
                   torch.tensor([label for _, label in data.val], dtype=torch.long), sample_weights)


def start_run(config: str, overrides: list[str]) -> tuple[Config, RunData]:
    """What both entry points do first: load and check the config, join the process group, read the
    data. Bad input raises ValueError/OSError naming the key or file, on every rank alike (each rank
    reads the same files), so callers print it and exit instead of hanging a peer."""
    from megaclass.engine import distributed
    from megaclass.engine.config import ConfigError, load_config

    from megaclass.io import check_writable

    cfg = load_config(config, overrides)
    if not cfg.data.root and not cfg.data.shards:
        raise ConfigError("data.root: not set; pass --set data.root=<WebVision-layout directory> "
                          "(or data.shards=<folder megaclass shards wrote>)")
    check_writable(cfg.run_dir, "run_dir", folder=True)  # checkpoints, logs, results: known before the group starts
    distributed.init(cfg)
    return cfg, load_run_data(cfg)
