"""Pipeline mode: the backbone as a DeepSpeed `PipelineModule` of `parallel.pipeline_stages` stages
built from LayerSpecs, the class-sharded head on the last stage.

With P ranks and S stages there are P/S data-parallel replicas. The head is sharded by class over
the last stage's data-parallel group and lives *outside* the PipelineModule (its loss function is a
plain callable, not a submodule), so the pipeline engine never averages its rows; it has its own
optimizer, stepped after each `train_batch`. DeepSpeed's pipeline engine supports ZeRO stage <= 1,
which the config check enforces. The loss function also applies model.drop_rate's dropout, keyed per
image as in data-parallel mode: each micro-batch's keys travel beside its labels to the last stage.
"""
from __future__ import annotations

import itertools

import deepspeed
import torch
from deepspeed.pipe import PipelineModule

from megaclass.engine.config import ConfigError
from megaclass.engine.distributed import unlink_shm_buffer
from megaclass.engine.optim import build_optimizer, build_schedule
from megaclass.engine.trainer import Trainer
from megaclass.models.backbones import create
from megaclass.models.pipeline import layer_specs, release_cache
from megaclass.nn import row_seeded_dropout
from megaclass.parallel import comm


class HeadLoss:
    """`loss_fn(features, (labels, weights, sample keys))` of the PipelineModule, run on the last stage:
    dropout (`drop_rate`, masks keyed by `Trainer.sample_keys` and `seed`), then the head. Deliberately not
    an nn.Module: a module would be registered inside the pipeline and its rows averaged."""

    def __init__(self, drop_rate: float, seed: int):
        self.drop_rate, self.seed = drop_rate, seed
        self.head, self.data_world = None, 1
        self.grad_into = lambda: None  # the trainer's `_head_grad_into`: where the head's dW goes

    def __call__(self, features: torch.Tensor, labels) -> torch.Tensor:
        target, weights, keys = labels
        training = torch.is_grad_enabled()  # evaluation makes no gradient and drops nothing
        features = row_seeded_dropout(features.float(), self.drop_rate, self.seed, keys, training)
        features = comm.scale_grad(features, self.data_world)  # undo DeepSpeed's data-parallel average
        into = self.grad_into() if training else None
        return self.head(features, target, weights, gather_input=True, weight_grad_into=into)


class PipelineTrainer(Trainer):
    """`Trainer` whose backbone runs as pipeline stages; `fit`, checkpoints and logging are shared."""

    def _build(self, backbone):
        cfg = self.cfg
        if backbone is not None:
            raise ConfigError("pipeline mode builds its backbone from model.name (LayerSpecs)")
        stages = cfg.parallel.pipeline_stages
        if self.world % stages:
            raise ConfigError(f"parallel.pipeline_stages: {stages} does not divide the {self.world} ranks")
        self.loss_fn = HeadLoss(cfg.model.drop_rate, self.row_dropout_seed)
        deepspeed.init_distributed(verbose=False)  # PipelineModule needs DeepSpeed's comm (wraps an existing group)
        unlink_shm_buffer()
        module = PipelineModule(layers=layer_specs(cfg.model.name, cfg.train.seed, cfg.model.checkpoint),
                                num_stages=stages, loss_fn=self.loss_fn, partition_method=cfg.parallel.partition_method)
        release_cache()
        grid = module._grid
        self.is_last_stage = grid.get_stage_id() == stages - 1
        self.data_rank, self.data_world = grid.get_data_parallel_id(), grid.get_data_parallel_world_size()
        self._schedule_steps(self.data_world)
        self.head = self.head_optimizer = self.head_schedule = None
        self.class_range = (0, 0)
        if self.is_last_stage:
            with torch.device("meta"):
                num_features = create(cfg.model.name).num_features
            self._build_head(num_features, grid.get_data_parallel_group())
            self.loss_fn.head, self.loss_fn.data_world = self.head, self.data_world
            self.loss_fn.grad_into = self._head_grad_into
        optimizer = build_optimizer(module.parameters(), cfg.optim, cfg.optim.lr)
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=build_schedule(optimizer, cfg.optim, self.total_steps),
            config=cfg.deepspeed_config())

    def train_step(self, batches) -> float:
        """One `train_batch` (grad_accum micro-batches through the pipeline), then the head's step."""
        def micro_batches():
            for micro in itertools.count():
                images, labels, index = next(batches)
                weights = (torch.ones(len(labels)) if self.data.sample_weights is None
                           else self.data.sample_weights[index])
                yield images.to(self.device, self.input_dtype), (labels.to(self.device), weights.to(self.device),
                                                                 self.sample_keys(micro).to(self.device))

        torch.manual_seed(self.dropout_seed())
        loss = self.engine.train_batch(data_iter=micro_batches())
        if self.is_last_stage:
            self._step_head()
        self.step += 1
        return float(loss)

    def _predict_batch_size(self) -> int:
        return self.cfg.train.micro_batch_size  # the pipeline's activation shapes stay those of training

    def _embed(self, images, labels):
        """Through the pipeline's stages; the features come out on the last stage alone."""
        batch = iter([(images, (labels, torch.ones(len(labels))))])
        self.engine.total_loss = None  # DeepSpeed 0.19 keeps train_batch's scalar and adds features to it
        _, features = self.engine.eval_batch(batch, return_logits=True, compute_loss=False, reduce_output=None,
                                             num_micro_batches=1)
        return features if self.is_last_stage else None

    def _share(self, probs, classes):
        """The last stage scored them: its last rank broadcasts the result."""
        last = self.world - 1  # global rank of a last-stage rank
        return comm.broadcast_(probs, last), comm.broadcast_(classes, last)


def trainer_class(cfg) -> type[Trainer]:
    """`PipelineTrainer` when the config asks for pipeline stages, else the data-parallel `Trainer`."""
    return PipelineTrainer if cfg.parallel.pipeline_stages > 1 else Trainer
