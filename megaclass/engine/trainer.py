"""Training with the backbone under a DeepSpeed engine and the classifier sharded by class.

One optimizer step (data-parallel mode, P ranks, each with its own micro-batch):

    features = engine(images)                      [n, D]   backbone: ZeRO 0-3 data parallel
    features = dropout(features)                   model.drop_rate, each image's mask keyed by its place
    loss = head(features, labels, weights, gather_input=True)
        all-gather features -> [P·n, D]; every rank scores them against its classes; the loss is the
        weighted mean over the global batch; d(features) returns by reduce-scatter
    engine.backward(loss); engine.step()           backbone gradients averaged by DeepSpeed
    head_optimizer.step()                          head rows never averaged: each rank owns its own

With SGD + momentum and no clipping, the op writes the head weight's gradient straight into the
momentum buffer (`weight_grad_into`, `InPlaceSGD.fold_target`): no [C_local, D] gradient per step.

Pipeline mode (`parallel.pipeline_stages > 1`) runs the backbone as a `PipelineModule` whose loss
function is the same head on the last stage, sharded over that stage's data-parallel group.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass

import deepspeed
import torch
from torch.utils.data import DataLoader, Dataset

from megaclass.engine import checkpoint, faults
from megaclass.engine.config import Config, ConfigError
from megaclass.engine.data import RankBatches, SeededItems, epoch_order_fn, prefetch_shards, sample_keys
from megaclass.engine.monitor import Monitor
from megaclass.engine.optim import InPlaceSGD, build_optimizer, build_schedule
from megaclass.memory import peak_memory_bytes
from megaclass.models import build_backbone
from megaclass.nn import ShardedLinearCrossEntropy, clip_head_grad_, row_seeded_dropout, sharded_topk
from megaclass.parallel import comm
from megaclass.seeding import derive_seed

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TrainData:
    """What a training run reads. `dataset[i]` -> (image [3, H, W], label, i)."""

    dataset: Dataset
    num_classes: int
    labels: torch.Tensor
    """[N] class index of every training image (class-balanced sampling)."""
    sample_weights: torch.Tensor | None = None
    """[N] loss weight s_i of every image; None = all ones."""
    wnids: list[str] | None = None
    """The class list in class-index order (synsets.txt), stored in checkpoints; a checkpoint of another
    list, or of the same classes in another order, is refused on load. None (tests): not checked."""


def device_of_rank() -> torch.device:
    accelerator = deepspeed.get_accelerator()
    name = accelerator.device_name()
    return torch.device(name, accelerator.current_device()) if name == "cuda" else torch.device(name)


class Trainer:
    """Builds the backbone engine, the sharded head and their optimizers for one run (`cfg.run_dir`).

    The process group must exist (`engine.distributed.init`). `backbone` replaces the configured
    model (tests pass small plain modules); it must map images to [n, num_features] features."""

    def __init__(self, cfg: Config, data: TrainData, backbone: torch.nn.Module | None = None, name: str = "train"):
        self.cfg, self.name = cfg, name
        self.data = dataclasses.replace(data, sample_weights=self.loss_weights(data.sample_weights))
        self.world, self.rank = comm.world_size(), comm.rank()
        self.device = device_of_rank()
        self.input_dtype = torch.bfloat16 if cfg.parallel.precision == "bf16" else torch.float32
        self.step = 0
        self.row_dropout_seed = derive_seed(cfg.train.seed, "row dropout")  # model.drop_rate's masks (`sample_keys`)
        self.checkpoint_step = None  # the step of the checkpoint this run last loaded or saved
        self.ckpt_root = os.path.join(cfg.run_dir, "checkpoints")
        self._build(backbone)

    def loss_weights(self, weights: torch.Tensor | None) -> torch.Tensor | None:
        """The per-image loss weights s_i used in training from the given ones: through `data.weight_knee`,
        then scaled to mean 1 (`data.normalize_weights`)."""
        if weights is not None and self.cfg.data.weight_knee is not None:
            weights = (weights / self.cfg.data.weight_knee).clamp(max=1.0)
        if weights is not None and self.cfg.data.normalize_weights:
            mean = float(weights.mean())
            if mean <= 0:
                raise ValueError("every loss weight is 0: nothing to train on")
            weights = weights / mean
        return weights

    def _schedule_steps(self, data_world: int) -> None:
        cfg = self.cfg
        # RankBatches.per_epoch: micro-steps (global batches of data_world × micro_batch_size) an epoch
        self.micro_steps_per_epoch = len(self.data.dataset) // (data_world * cfg.train.micro_batch_size)
        self.steps_per_epoch = self.micro_steps_per_epoch // cfg.train.grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.data.dataset)} training images do not fill one optimizer step of "
                             f"{data_world} data-parallel ranks × train.micro_batch_size {cfg.train.micro_batch_size} × "
                             f"train.grad_accum {cfg.train.grad_accum}")
        self.total_steps = max(1, math.ceil(cfg.train.epochs * self.steps_per_epoch))
        self.last_step = min(self.total_steps, cfg.train.max_steps) if cfg.train.max_steps else self.total_steps

    def _build_head(self, num_features: int, process_group=None) -> None:
        """The class-sharded head over `process_group` (None: all ranks), its optimizer and schedule."""
        cfg = self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.train.seed, "head"))
            self.head = ShardedLinearCrossEntropy(num_features, self.data.num_classes, process_group, bias=cfg.head.bias,
                                                  label_smoothing=cfg.head.label_smoothing,
                                                  chunk_size=cfg.head.chunk_size).to(self.device)
        self.class_range = (self.head.class_start, self.head.class_end)
        head_optim = dataclasses.replace(cfg.optim, name=cfg.head.optimizer or cfg.optim.name)  # never LAMB (config)
        # in place: torch's SGD step holds two head-sized transients (weight decay, first momentum buffer)
        self.head_optimizer = build_optimizer(self.head.parameters(), head_optim, cfg.optim.lr * cfg.head.lr_scale,
                                              in_place=True)
        self.head_schedule = build_schedule(self.head_optimizer, cfg.optim, self.total_steps)

    def _build(self, backbone: torch.nn.Module | None) -> None:
        cfg = self.cfg
        if cfg.parallel.pipeline_stages > 1:
            raise ConfigError("parallel.pipeline_stages > 1: use megaclass.engine.pipeline.PipelineTrainer")
        if backbone is None:
            backbone = build_backbone(cfg.model.name, cfg.model.checkpoint, seed=cfg.train.seed)
        self.data_rank, self.data_world = self.rank, self.world
        self._schedule_steps(self.world)
        self._build_head(backbone.num_features)
        optimizer = build_optimizer(backbone.parameters(), cfg.optim, cfg.optim.lr)
        self.engine, _, _, _ = deepspeed.initialize(
            model=backbone, optimizer=optimizer, lr_scheduler=build_schedule(optimizer, cfg.optim, self.total_steps),
            config=cfg.deepspeed_config())

    # -- training ------------------------------------------------------------------------------
    def _order_fn(self):
        labels = self.data.labels if self.cfg.data.class_balanced else None
        return epoch_order_fn(self.data.dataset, self.cfg.train.seed, labels, self.cfg.data.shuffle_buffer)

    def _loader(self, dataset: Dataset, sampler: RankBatches, seed: int) -> DataLoader:
        workers = self.cfg.data.num_workers
        return DataLoader(SeededItems(dataset, seed), batch_sampler=sampler, num_workers=workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=False,
                          prefetch_factor=4 if workers else None, worker_init_fn=faults.ignore_preemption_signals)

    def resume(self) -> int:
        """Load `run_dir/checkpoints/latest` when there is one (and train.resume); returns the step."""
        folder = checkpoint.latest_checkpoint(self.ckpt_root) if self.cfg.train.resume else None
        return self.load(folder) if folder is not None else self.step

    def load(self, folder: str) -> int:
        """Collective: restore the engine, the head and their optimizers from the checkpoint `folder`."""
        self.step = checkpoint.load(folder, self.engine, self.head, self.head_optimizer, self.class_range,
                                    self.data.num_classes, classes=self.data.wnids)
        self.load_extra(folder)
        self.checkpoint_step = self.step
        log.info("%s: loaded %s (step %d)", self.name, folder, self.step)
        for _ in range(self.step if self.head is not None else 0):
            self.head_schedule.step()
        return self.step

    def save(self) -> str | None:
        """Checkpoint this step (collective); a step this run already loaded or saved is not written again.
        A failed save (`checkpoint.SaveError`, on every rank alike) raises, or with checkpoint.on_save_error
        "continue" is logged and returns None (the next save retries), except the last step's save."""
        if self.step == self.checkpoint_step:
            return checkpoint.latest_checkpoint(self.ckpt_root)
        try:
            folder = checkpoint.save(self.ckpt_root, self.step, self.engine, self.head, self.head_optimizer,
                                     self.class_range, self.data.num_classes, writer=self.rank == 0,
                                     keep=self.cfg.checkpoint.keep, extra_meta=self._meta(), extra=self.save_extra)
        except checkpoint.SaveError as exc:
            if self.cfg.checkpoint.on_save_error == "stop" or self.step >= self.last_step:
                raise
            log.error("%s: %s. Training goes on (checkpoint.on_save_error: continue); the next save retries",
                      self.name, exc)
            return None
        self.checkpoint_step = self.step
        log.info("%s: saved %s", self.name, folder)
        return folder

    def save_extra(self, folder: str) -> None:
        """Write this rank's state beyond the model's into checkpoint `folder` (a subclass's; none here)."""

    def load_extra(self, folder: str) -> None:
        """Restore what `save_extra` wrote into checkpoint `folder` (none here)."""

    def observe(self, features: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> None:
        """See each training micro-batch's features [n, D] (detached), labels and image indices (none here)."""

    def end_epoch(self, epoch: int) -> None:
        """Called on every rank when epoch `epoch` (counted from 1) has ended (nothing here)."""

    def _meta(self) -> dict:
        """What meta.json records beside the step, world size and class count."""
        meta = {"model": self.cfg.model.name, "epoch": self.step / self.steps_per_epoch}
        return {**meta, "classes": list(self.data.wnids)} if self.data.wnids else meta

    def train_step(self, batches) -> float:
        """One optimizer step over `grad_accum` micro-batches; returns the global mean loss."""
        accum, total = self.cfg.train.grad_accum, 0.0
        for micro in range(accum):
            images, labels, index = next(batches)
            images, labels = images.to(self.device, self.input_dtype, non_blocking=True), labels.to(self.device)
            weights = None if self.data.sample_weights is None else self.data.sample_weights[index].to(self.device)
            torch.manual_seed(self.dropout_seed(micro))
            features = row_seeded_dropout(self.engine(images).float(), self.cfg.model.drop_rate, self.row_dropout_seed,
                                          self.sample_keys(micro).to(self.device), self.engine.training)
            # the head's loss is the mean over the gathered global batch, so these features get the exact
            # gradient of the global loss; DeepSpeed then averages the backbone's over the P ranks: scale by P
            features = comm.scale_grad(features, self.data_world)
            loss = self.head(features, labels, weights, gather_input=True, weight_grad_into=self._head_grad_into())
            self.observe(features.detach(), labels, index)
            self.engine.backward(loss)
            self.engine.step()
            total += float(loss.detach())
        self._step_head()
        self.step += 1
        return total / accum

    def dropout_seed(self, micro: int = 0) -> int:
        """The random state of micro-step `step · grad_accum + micro`, for whatever the backbone draws itself
        (a given backbone's own dropout, drop-path): a resumed run redraws what an unbroken one drew, on the
        same number of ranks. The pipeline seeds once per step, at its first micro-step."""
        return derive_seed(self.cfg.train.seed, "dropout", self.step * self.cfg.train.grad_accum + micro)

    def sample_keys(self, micro: int) -> torch.Tensor:
        """[micro_batch_size] int64: the keys of model.drop_rate's masks in this rank's micro-batch `micro` of
        this step, each image's place in the run (`data.sample_keys`), so the same on any number of ranks."""
        return sample_keys(self.step * self.cfg.train.grad_accum + micro, self.micro_steps_per_epoch, self.data_rank,
                           self.data_world, self.cfg.train.micro_batch_size)

    def _head_grad_into(self) -> tuple | None:
        """Where the head's weight gradient of this micro-batch goes instead of a fresh weight.grad (a
        [C_local, D] tensor each step): into the SGD momentum buffer, scaled by 1/grad_accum as
        DeepSpeed's engine.backward scales the loss. None (weight.grad as usual) when clipping needs the
        bare gradient or the head's optimizer cannot fold (not SGD with momentum)."""
        if self.cfg.optim.grad_clip or not isinstance(self.head_optimizer, InPlaceSGD):
            return None
        target = self.head_optimizer.fold_target(self.head.weight)
        return None if target is None else (*target, 1.0 / self.cfg.train.grad_accum)

    def _step_head(self) -> None:
        """The head's own optimizer step (outside DeepSpeed, so its rows are never averaged)."""
        if self.cfg.optim.grad_clip:
            clip_head_grad_(self.head, self.cfg.optim.grad_clip, self.head.process_group)
        self.head_optimizer.step()
        self.head_optimizer.zero_grad(set_to_none=True)
        self.head_schedule.step()

    def fit(self, val: tuple[Dataset, torch.Tensor] | None = None) -> list[dict]:
        """Train from the latest checkpoint (if any) to the last step; returns the logged rows.
        With `val` = (dataset, labels), evaluate every `eval.every_epochs` epochs into
        `self.eval_rows`, `<name>_eval.csv` and TensorBoard (`val/top1`, `val/top5`).
        A preemption signal to any rank (`faults.agree_to_stop`, checked after every step) saves the
        step reached on every rank and raises `faults.Preempted`."""
        cfg = self.cfg
        self.eval_rows = []
        start = self.resume()
        prefetch_shards(self.data.dataset, cfg.train.seed, start * cfg.train.grad_accum // self.micro_steps_per_epoch)
        accum = cfg.train.grad_accum
        sampler = RankBatches(len(self.data.dataset), self.data_rank, self.data_world, cfg.train.micro_batch_size,
                              total_micro_steps=self.last_step * accum, order_fn=self._order_fn(), start=start * accum)
        monitor = Monitor(cfg.run_dir, self.name, self.last_step, start, enabled=self.rank == 0,
                          progress=cfg.train.progress)
        batches = iter(self._loader(self.data.dataset, sampler, cfg.train.seed))
        global_batch = self.data_world * cfg.train.micro_batch_size * accum
        log.info("%s: steps %d -> %d of %d (%d an epoch), %d ranks (%d data-parallel), global batch %d, %d classes",
                 self.name, start, self.last_step, self.total_steps, self.steps_per_epoch, self.world, self.data_world,
                 global_batch, self.data.num_classes)
        rows = []
        self.engine.train()
        try:
            while self.step < self.last_step:
                t0 = time.perf_counter()
                loss = self.train_step(batches)
                seconds = time.perf_counter() - t0
                row = {"epoch": self.step / self.steps_per_epoch, "loss": loss, "lr": self.engine.get_lr()[0],
                       "images_per_s": global_batch / seconds, "peak_mem_mb": peak_memory_bytes(self.device) / 2**20}
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {self.step}; lower optim.lr")
                monitor.advance(loss=loss, img_s=row["images_per_s"])
                if self.step % cfg.train.log_every == 0 or self.step == self.last_step:
                    monitor.log(self.step, **row)
                    rows.append({"step": self.step, **row})
                epoch, end_of_epoch = divmod(self.step, self.steps_per_epoch)
                if end_of_epoch == 0:  # before a save of this step: a resumed run would not run it again
                    self.end_epoch(epoch)
                if cfg.train.save_every and self.step % cfg.train.save_every == 0 and self.step < self.last_step:
                    self.save()
                if val is not None and cfg.eval.every_epochs and end_of_epoch == 0 and epoch % cfg.eval.every_epochs == 0:
                    result = {"epoch": epoch, **self.evaluate(*val)}
                    self.eval_rows.append(result)
                    log.info("%s: epoch %d: validation top-1 %.2f%%  top-5 %.2f%%", self.name, epoch,
                             result["top1"], result["top5"])
                    monitor.log_eval(self.step, **result)
                    self.engine.train()
                if faults.agree_to_stop(self.device) and self.step < self.last_step:
                    raise faults.Preempted(faults.preempted_message(self.step, self.save()))
        finally:
            monitor.close()
        self.save()
        return rows

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, dataset: Dataset, k: int, desc: str = "predict") -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (probs [N, k], classes [N, k]) of every item of `dataset`, on every rank; an item the
        dataset could not read (it served another in its place) keeps class -1, probability 0.

        Each data-parallel replica embeds its slice of every global batch (`_embed`); the ranks that
        hold the head gather the features over its group and score them against their classes
        (`sharded_topk`); `_share` gives every rank the result."""
        sampler = RankBatches(len(dataset), self.data_rank, self.data_world, self._predict_batch_size())
        probs = torch.zeros(len(dataset), k)
        classes = torch.full((len(dataset), k), -1, dtype=torch.long)  # -1: no prediction (unreadable image)
        self.engine.eval()
        bar = None
        if self.rank == 0 and self.cfg.train.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(sampler), desc=desc, unit="batch", dynamic_ncols=True)
        for images, labels, index in self._loader(dataset, sampler, seed=0):
            features = self._embed(images.to(self.device, self.input_dtype), labels)
            if features is not None:
                group = self.head.process_group
                everyone = comm.all_gather_stacked(features.float(), group).reshape(-1, features.shape[1])
                all_index = comm.all_gather_stacked(index.to(self.device), group).reshape(-1).cpu()
                p, c = sharded_topk(everyone, self.head.weight, self.head.bias, self.class_range[0], k, group)
                keep = all_index >= 0
                probs[all_index[keep]], classes[all_index[keep]] = p[keep].cpu(), c[keep].cpu()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return self._share(probs, classes)

    def _predict_batch_size(self) -> int:
        return self.cfg.eval.batch_size

    def _embed(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """This rank's features [n, D] of a prediction batch, or None where it holds no head."""
        return self.engine(images)

    def _share(self, probs: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank scored the whole batch: nothing to share."""
        return probs, classes

    def evaluate(self, dataset: Dataset, labels: torch.Tensor) -> dict:
        """Class-balanced top-1/top-5 in percent: accuracy per class, averaged over the classes present."""
        _, classes = self.predict(dataset, self.cfg.eval.topk, desc="evaluate")
        return balanced_topk(classes, labels)

    def close(self) -> None:
        """Free the engine (several runs can follow each other in one process)."""
        self.engine.destroy()
        self.engine = self.head = self.head_optimizer = None


def balanced_topk(classes: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """classes: [N, k] predictions best first; labels: [N]. Per-class top-k accuracy averaged over
    the classes that occur in `labels`, in percent (WebVision's ranking metric). Rows without a
    prediction (class -1: the image could not be read) are left out, not counted as misses."""
    predicted = classes[:, 0] >= 0
    if not bool(predicted.any()):
        raise ValueError("no image of the evaluation set could be read: nothing to score")
    classes, labels = classes[predicted], labels[predicted]
    out = {}
    present = labels.unique()
    for k in ks:
        hit = (classes[:, :k] == labels[:, None]).any(dim=1).float()
        per_class = torch.zeros(int(labels.max()) + 1).index_add_(0, labels, hit)
        counts = torch.bincount(labels, minlength=per_class.numel()).float()
        out[f"top{k}"] = float((per_class[present] / counts[present]).mean() * 100)
    return out
