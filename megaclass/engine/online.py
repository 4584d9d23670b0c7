"""One training that re-estimates its own loss weights (`experiment.mode: online | online_loss`).

    epoch e < warm-up:  train with the start weights (no model needed: rank and page text, or 1)
    epoch e ≥ warm-up:  every training step's global batch is also scored by the head it just trained
                        on (`sharded_topk`: top-k and log p(label), one extra forward GEMM of the head,
                        no extra pass over the images); each rank adds the rows of the images it owns
                        (index ≡ rank mod P) to their running sums (`ImageViews`)
    end of each epoch ≥ warm-up: the ranks' views go to rank 0, which re-estimates every image's weight
                        (the experiment's `estimate`, megaclass.weighting.online); the weights are
                        broadcast and train the next epoch

The views are moving averages over the epochs since the warm-up (`ImageViews`), not the last epoch's
alone: a network that has begun to memorize its labels judges them right, and its earlier epochs
temper that.
Checkpoints carry each rank's views and the weights in use, so a resumed run (at any world size)
re-estimates exactly what an unbroken one does.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import torch

from megaclass.engine import checkpoint
from megaclass.engine.trainer import Trainer, TrainData
from megaclass.io import atomic_output
from megaclass.nn import sharded_topk
from megaclass.parallel import comm
from megaclass.weighting.stage1 import CELLS, prediction_cells

log = logging.getLogger(__name__)

STATE_DIR = "online"


class OnlineWeightingError(RuntimeError):
    """The re-estimate failed on rank 0; raised on every rank alike."""


MOMENTUM = 0.7
"""Each epoch's views enter their moving average with weight 1 − MOMENTUM: ELR's published temporal
ensembling constant (Liu et al. 2020, β = 0.7), not one chosen on these data."""


class ImageViews:
    """What the training forward passes said about the images this rank owns (global index ≡ rank mod
    world). Within an epoch: visits, Σ p(label), Σ −log p(label) and how often the top-1 fell in each
    stage-1 cell (`record`); at its end (`fold`) each seen image's epoch means enter moving averages,
    m ← MOMENTUM·m + (1 − MOMENTUM)·epoch mean (the first epoch that sees it: its mean). The latest
    top-k classes are kept as they are."""

    ARRAYS = ("visits", "p_sum", "loss_sum", "cell_sum", "p_label", "loss", "cells", "top_k")

    def __init__(self, num_images: int, rank: int, world: int, k: int):
        self.num_images, self.rank, self.world, self.k = num_images, rank, world, k
        self.index = np.arange(rank, num_images, world, dtype=np.int64)
        m, c = len(self.index), len(CELLS)
        self.visits, self.p_sum, self.loss_sum = np.zeros(m, np.uint16), np.zeros(m, np.float32), np.zeros(m, np.float32)
        self.cell_sum = np.zeros((m, c), np.uint16)
        self.p_label, self.loss = np.full(m, np.nan, np.float32), np.full(m, np.nan, np.float32)  # NaN: never seen
        self.cells = np.zeros((m, c), np.float16)  # moving average of the cell's one-hot
        self.top_k = np.full((m, k), -1, np.int32)

    @property
    def bytes_per_image(self) -> int:
        return sum(getattr(self, name).itemsize * int(np.prod(getattr(self, name).shape[1:])) for name in self.ARRAYS)

    def record(self, index: np.ndarray, labels: np.ndarray, probs: np.ndarray, classes: np.ndarray,
               log_p: np.ndarray, neighbors: np.ndarray) -> None:
        """Add the rows of a scored global batch (index [n], labels [n], top-k probs/classes [n, k],
        log p(label) [n]) that this rank owns."""
        mine = (index >= 0) & (index % self.world == self.rank)
        rows = index[mine] // self.world
        cell, _ = prediction_cells(labels[mine], classes[mine], probs[mine], neighbors)
        np.add.at(self.visits, rows, 1)
        np.add.at(self.p_sum, rows, np.exp(log_p[mine]).astype(np.float32))
        np.add.at(self.loss_sum, rows, (-log_p[mine]).astype(np.float32))
        np.add.at(self.cell_sum, (rows, cell), 1)
        self.top_k[rows] = classes[mine]

    def fold(self) -> None:
        """End of an epoch: its means into the moving averages, its sums back to 0."""
        seen = self.visits > 0
        n = self.visits[seen].astype(np.float32)
        first = seen & np.isnan(self.p_label)
        for average, mean in ((self.p_label, self.p_sum[seen] / n), (self.loss, self.loss_sum[seen] / n)):
            average[seen] = np.where(first[seen], mean, MOMENTUM * average[seen] + (1 - MOMENTUM) * mean)
        share = self.cell_sum[seen] / n[:, None]
        self.cells[seen] = np.where(first[seen, None], share, MOMENTUM * self.cells[seen] + (1 - MOMENTUM) * share)
        for name in ("visits", "p_sum", "loss_sum", "cell_sum"):
            getattr(self, name)[:] = 0

    def state(self) -> dict:
        return {"index": self.index, **{name: getattr(self, name) for name in self.ARRAYS}}

    def load(self, states: list[dict]) -> None:
        """Take this rank's rows from the states of every rank of a run at any world size."""
        for state in states:
            keep = state["index"] % self.world == self.rank
            rows = state["index"][keep] // self.world
            for name in self.ARRAYS:
                getattr(self, name)[rows] = state[name][keep]

    def gather(self) -> dict | None:
        """Rank 0: every image's moving averages, in index order (`cell` -1 and `p_label`, `loss` NaN
        where the image was never seen); None on the other ranks. Call after `fold`."""
        parts = comm.gather_objects_to({"index": self.index, **{name: getattr(self, name)
                                                               for name in ("p_label", "loss", "cells", "top_k")}})
        if parts is None:
            return None
        n = self.num_images
        p_label, loss = np.full(n, np.nan), np.full(n, np.nan)
        cells, top_k = np.zeros((n, len(CELLS)), np.float16), np.full((n, self.k), -1, np.int32)
        for part in parts:
            p_label[part["index"]], loss[part["index"]] = part["p_label"], part["loss"]
            cells[part["index"]], top_k[part["index"]] = part["cells"], part["top_k"]
        seen = ~np.isnan(p_label)
        return {"seen": seen, "cell": np.where(seen, cells.argmax(1), -1), "p_label": p_label, "loss": loss,
                "top_k": top_k}


class OnlineTrainer(Trainer):
    """A `Trainer` whose loss weights are re-estimated at each epoch end from `ImageViews`.

    estimate(views | None, epoch[, current]) -> weights [N] in (0, 1] runs on rank 0 alone: with None for
    the start weights (before training), then at the end of each epoch from the warm-up on with
    `ImageViews.gather()`'s dict and the weights in use (restored with a checkpoint). neighbors: [C, K] the labels' K nearest categories (stage 1's cells)."""

    def __init__(self, cfg, data: TrainData, estimate, neighbors: np.ndarray, warmup_epochs: int,
                 backbone=None, name: str = "online"):
        self.estimate, self.neighbors, self.warmup_epochs = estimate, neighbors, warmup_epochs
        self.posterior = None  # the estimate in use (before the trainer's normalization), rank 0's
        super().__init__(cfg, data, backbone, name)
        self.views = ImageViews(len(data.labels), self.rank, self.world, cfg.eval.topk)
        self._apply(self._agree_on(lambda: estimate(None, 0), "the start weights"))

    def _agree_on(self, fn, what: str) -> torch.Tensor:
        """Run `fn()` -> weights on rank 0; every rank gets them, or the same OnlineWeightingError."""
        weights, error = None, None
        if self.rank == 0:
            try:
                weights = torch.as_tensor(np.asarray(fn(), dtype=np.float64))
            except Exception as exc:  # any failure: every rank must hear of it
                error = f"{type(exc).__name__}: {exc}"
                log.exception("%s: %s failed", self.name, what)
        failed = comm.gather_ints([error is not None], device=self.device)[0][0]
        if failed:
            raise OnlineWeightingError(f"{what} failed on rank 0 ({error or 'see rank 0'})")
        out = weights.to(self.device) if weights is not None else torch.empty(len(self.data.labels),
                                                                               dtype=torch.float64, device=self.device)
        return comm.broadcast_(out, src=0).cpu()

    def _apply(self, posterior: torch.Tensor) -> None:
        self.posterior = posterior
        self.data = dataclasses.replace(self.data, sample_weights=self.loss_weights(posterior.float()))

    def observe(self, features, labels, index) -> None:
        if self.step // self.steps_per_epoch < self.warmup_epochs:
            return
        group = self.head.process_group
        everyone = comm.all_gather_stacked(features.float(), group).reshape(-1, features.shape[1])
        all_labels = comm.all_gather_stacked(labels, group).reshape(-1)
        all_index = comm.all_gather_stacked(index.to(self.device), group).reshape(-1).cpu()
        probs, classes, log_p = sharded_topk(everyone, self.head.weight.detach(),
                                             None if self.head.bias is None else self.head.bias.detach(),
                                             self.class_range[0], self.cfg.eval.topk, group, labels=all_labels)
        self.views.record(all_index.numpy(), all_labels.cpu().numpy(), probs.cpu().numpy(),
                          classes.cpu().numpy(), log_p.cpu().numpy(), self.neighbors)

    def end_epoch(self, epoch: int) -> None:
        if epoch <= self.warmup_epochs or self.step >= self.total_steps:
            return  # nothing seen yet, or no epoch left to weigh
        self.views.fold()
        views = self.views.gather()
        current = self.posterior.numpy() if self.rank == 0 else None
        self._apply(self._agree_on(lambda: self.estimate(views, epoch, current), f"the re-estimate after epoch {epoch}"))

    def save_extra(self, folder: str) -> None:
        where = os.path.join(folder, STATE_DIR)
        os.makedirs(where, exist_ok=True)
        with atomic_output(os.path.join(where, f"views-rank{self.rank:05d}.npz")) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **self.views.state())
        if self.rank == 0:
            with atomic_output(os.path.join(where, "weights.npy")) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, self.posterior.numpy())

    def load_extra(self, folder: str) -> None:
        where = os.path.join(folder, STATE_DIR)
        names = sorted(n for n in os.listdir(where) if n.startswith("views-rank")) if os.path.isdir(where) else []
        if not names or not os.path.isfile(os.path.join(where, "weights.npy")):
            raise checkpoint.CheckpointError(f"{folder}: no {STATE_DIR}/ views and weights: not a checkpoint of an "
                                             f"online run (experiment.mode online); resume it with the mode it was "
                                             f"saved with")
        states = []
        try:
            for name in names:
                with np.load(os.path.join(where, name)) as z:
                    states.append({key: z[key] for key in ("index", *ImageViews.ARRAYS)})
            weights = np.load(os.path.join(where, "weights.npy"))
        except (OSError, ValueError, KeyError) as exc:
            raise checkpoint.CheckpointError(f"{where}: unreadable online state ({type(exc).__name__}: {exc})") from None
        self.views.load(states)
        self._apply(torch.from_numpy(weights))
