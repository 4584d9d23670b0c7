"""Run configuration: YAML files validated against dataclasses, `--set key=value` overrides, and the
DeepSpeed config generated from them.

Every section is a dataclass; an unknown key anywhere is an error that names its dotted path, and
values are checked in `__post_init__` so that a bad config fails before any process group or model
exists: every number must be finite (YAML's `.inf` and `.nan` are refused wherever a float is
read) and in its range, the model name must be known and a model checkpoint must exist. `deepspeed:` holds raw DeepSpeed settings merged over the generated ones (for what this
schema does not cover, e.g. ZeRO offload); keys that megaclass sets itself are refused there.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key (and the file when known)."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    name: str = "resnet_tiny"
    """A timm model name (built without pretrained weights) or a megaclass small model (`resnet_tiny`)."""
    checkpoint: str | None = None
    """Optional local checkpoint of the backbone (a state dict or a dict with `state_dict`/`model`)."""
    drop_rate: float = 0.0
    """Dropout on the backbone's features before the classifier (in place of timm's `drop_rate`), each
    image's mask keyed by its place in the epoch, so that a run resumed on another number of ranks drops
    the same features (`megaclass.nn.row_seeded_dropout`)."""

    def __post_init__(self):
        from megaclass.models.backbones import check_model_name

        _check(0.0 <= self.drop_rate < 1.0, "model.drop_rate", f"must be in [0, 1), got {self.drop_rate}")
        try:
            check_model_name(self.name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        _check(self.checkpoint is None or os.path.isfile(self.checkpoint), "model.checkpoint",
               f"no such file: {self.checkpoint}")


OPTIMIZERS = ("sgd", "adam", "adamw", "deepspeed_adam", "deepspeed_lamb", "apex_fused_lamb")
HEAD_OPTIMIZERS = ("sgd", "adam", "adamw", "deepspeed_adam")  # element-wise updates: the same for any sharding


@dataclass(kw_only=True, slots=True)
class HeadConfig:
    label_smoothing: float = 0.0
    """F.cross_entropy's label smoothing ε."""
    bias: bool = False
    """Give the classifier a bias (sharded with its rows)."""
    chunk_size: int | None = None
    """Rows per chunk of the fused op (None: its default)."""
    lr_scale: float = 1.0
    """The head's learning rate is optim.lr times this."""
    optimizer: str | None = None
    """The head's optimizer: one of sgd, adam, adamw, deepspeed_adam (None: optim.name). No LAMB: its
    trust ratio is a per-tensor norm, and the head's tensors are per-rank shards, so the step would
    change with the number of ranks. With a LAMB backbone, set this (e.g. adamw)."""

    def __post_init__(self):
        _check(self.optimizer in (None, *HEAD_OPTIMIZERS), "head.optimizer",
               f"must be one of {', '.join(HEAD_OPTIMIZERS)}, got {self.optimizer!r}")
        _check(0.0 <= self.label_smoothing < 1.0, "head.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        _check(self.chunk_size is None or self.chunk_size > 0, "head.chunk_size", "must be positive")
        _check(self.lr_scale > 0, "head.lr_scale", "must be positive")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    root: str = ""
    """A WebVision-layout directory (info/synsets.txt, info/train_filelist_*.txt, ...)."""
    image_size: int = 224
    """Training crop side; evaluation resizes to this too."""
    weights: str | None = None
    """Per-image loss weights TSV (`<image path>\\t<weight>`); None = every weight 1."""
    weight_knee: float | None = None
    """Loss weights at or above this value count fully (1), those below it in proportion (w / knee);
    None (the default, and what every shipped config uses): the weights as given. The weighting's
    weights are posteriors P(the label is right) estimated from the training data
    (docs/weighting.md), so using them as they are weights each image's loss by its chance of being
    right; a knee is a hand-set constant and is kept only for weights from elsewhere."""
    normalize_weights: bool = True
    """Scale the loss weights to mean 1 over the training set: only their ratios matter then, and the
    learning rate keeps its meaning (with "mean" reduction, weights averaging 0.5 would halve it)."""
    class_balanced: bool = False
    """Sample training images class-balanced instead of uniformly."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    limit_train: int = 0
    """Use only the first N training images (0 = all); for smoke runs."""
    shards: str | None = None
    """A folder `megaclass shards` wrote: train, evaluate and predict from its tar shards instead of the
    files under `root` (which is then optional; the class list comes from its index.json). Or that folder
    in an object store, as a URL: `pipe:aws s3 cp s3://bucket/shards/{name} -`, `https://host/shards`
    (docs/scale.md); its files are copied once per node into `shard_cache`."""
    shard_cache: str | None = None
    """With a `shards` URL: the node-local folder its files are copied into (default $TMPDIR/megaclass-shards)."""
    shuffle_buffer: int = 10_000
    """With `shards`: samples in the shuffle buffer that follows the seeded shard order (docs/data.md)."""

    def __post_init__(self):
        _check(self.image_size >= 8, "data.image_size", f"must be at least 8, got {self.image_size}")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.limit_train >= 0, "data.limit_train", "must be >= 0")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", f"must be at least 1, got {self.shuffle_buffer}")
        _check(self.weight_knee is None or 0 < self.weight_knee <= 1, "data.weight_knee",
               f"must be in (0, 1] or null, got {self.weight_knee}")
        if self.shards:
            from megaclass.data.store import url_problem

            problem = url_problem(self.shards)
            _check(problem is None, "data.shards", problem or "")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    name: str = "sgd"
    """One of: sgd, adam, adamw (torch), deepspeed_adam, deepspeed_lamb (DeepSpeed ops), apex_fused_lamb."""
    lr: float = 0.1
    """Peak learning rate for a global batch of `train.micro_batch_size × grad_accum × ranks`."""
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps."""
    schedule: str = "cosine"
    """After warm-up: `cosine` (to 0 at the last step) or `constant`."""
    grad_clip: float = 0.0
    """Clip the gradient norm to this (0 = off): the backbone's by DeepSpeed, the head's over all its
    shards, each separately. (DeepSpeed alone would clip only the backbone, at 1.0 by default.)"""

    def __post_init__(self):
        _check(self.name in OPTIMIZERS, "optim.name", f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")
        _check(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        _check(0 <= self.momentum < 1, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
        _check(self.schedule in ("cosine", "constant"), "optim.schedule", f"must be cosine or constant, got {self.schedule!r}")
        _check(len(self.betas) == 2, "optim.betas", "must be two numbers")
        self.betas = tuple(float(b) for b in self.betas)
        for i, beta in enumerate(self.betas):  # as torch.optim.Adam checks them
            _check(0 <= beta < 1, f"optim.betas[{i}]", f"must be in [0, 1), got {beta}")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    epochs: float = 1.0
    """Passes over the training images (fractions allowed)."""
    micro_batch_size: int = 32
    """Images per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seed: int = 0
    """Seeds the model, the classifier, the data order and augmentation: same seed, same run."""
    log_every: int = 1
    """Write a CSV/TensorBoard row every N optimizer steps."""
    save_every: int = 0
    """Save a checkpoint every N optimizer steps (0 = only at the end)."""
    max_steps: int = 0
    """Stop after N optimizer steps (0 = run all epochs); the schedule still spans all epochs."""
    resume: bool = True
    """Resume from `run_dir/checkpoints/latest` when it exists."""
    progress: bool = True
    """Show a tqdm progress bar on rank 0."""

    def __post_init__(self):
        _check(self.epochs > 0, "train.epochs", f"must be positive, got {self.epochs}")
        _check(self.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
        _check(self.grad_accum > 0, "train.grad_accum", "must be positive")
        _check(self.log_every > 0, "train.log_every", "must be positive")
        _check(self.save_every >= 0, "train.save_every", "must be >= 0")
        _check(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        _check(0 <= self.seed < 2**32, "train.seed", f"must be in [0, 2**32) (numpy's and torch's seed range), got {self.seed}")


SAVE_ERROR_POLICIES = ("stop", "continue")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    keep: int = 2
    """Complete checkpoints kept (the newest); at least 2, so that one damaged after it was written (a
    disk that loses it, a failed copy) still leaves a complete one to resume from."""
    on_save_error: str = "stop"
    """A save that fails (no space, an I/O error, no permission) raises on every rank and leaves `latest`
    on the previous checkpoint. "stop": training stops with that error. "continue": training goes on
    (logging the error) and the next save retries; the run fails at its end if the final save fails."""

    def __post_init__(self):
        _check(self.keep >= 2, "checkpoint.keep", f"must be >= 2 (a damaged newest checkpoint must leave another), "
               f"got {self.keep}")
        _check(self.on_save_error in SAVE_ERROR_POLICIES, "checkpoint.on_save_error",
               f"must be one of {', '.join(SAVE_ERROR_POLICIES)}, got {self.on_save_error!r}")


MAX_TIMEOUT_S = 365 * 86_400  # a collective waiting longer has hung; datetime.timedelta overflows far beyond


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    zero_stage: int = 0
    """DeepSpeed ZeRO stage of the backbone (0-3); the classifier is class-sharded regardless."""
    pipeline_stages: int = 1
    """>1: the backbone runs as a DeepSpeed PipelineModule of this many stages (ZeRO <= 1)."""
    partition_method: str = "parameters"
    """How DeepSpeed balances pipeline stages: parameters, uniform, or type:<regex>."""
    precision: str = "fp32"
    """fp32 or bf16 (DeepSpeed's bf16 mode for the backbone; the head takes fp32 features and keeps fp32
    weights). fp16 is not offered: its dynamic loss scale would also scale the head's gradients."""
    timeout_s: float = 600.0
    """Collective timeout: a collective that has not finished after this long fails. Keep it long (slow
    saves, evaluation); a dead or stopped rank is noticed by the heartbeat instead."""
    heartbeat_s: float = 60.0
    """A rank that died or stopped answering (SIGKILL, SIGSTOP, a lost node) is noticed by every other
    rank within this many seconds, which then exit naming it (docs/faults.md). Each rank beats 6 times
    in this interval; at least 3 s."""
    backend: str | None = None
    """torch.distributed backend (None: DeepSpeed's choice, gloo on CPU, nccl on CUDA)."""

    def __post_init__(self):
        _check(self.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(self.pipeline_stages >= 1, "parallel.pipeline_stages", "must be >= 1")
        _check(self.pipeline_stages == 1 or self.zero_stage <= 1, "parallel.zero_stage",
               f"DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only, got {self.zero_stage} with "
               f"parallel.pipeline_stages={self.pipeline_stages}; set parallel.zero_stage to 0 or 1, or pipeline_stages to 1")
        _check(self.precision in ("fp32", "bf16"), "parallel.precision", f"must be fp32 or bf16, got {self.precision!r}")
        _check(0 < self.timeout_s <= MAX_TIMEOUT_S, "parallel.timeout_s",
               f"must be in (0, {MAX_TIMEOUT_S}] seconds (a year), got {self.timeout_s}")
        _check(3 <= self.heartbeat_s <= MAX_TIMEOUT_S, "parallel.heartbeat_s",
               f"must be in [3, {MAX_TIMEOUT_S}] seconds (a beat every heartbeat_s/6; shorter would mistake a busy "
               f"rank for a lost one), got {self.heartbeat_s}")


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    batch_size: int = 64
    """Images per rank per evaluation/prediction batch."""
    topk: int = 5
    """Predictions written per image (PRED_TSV) and the largest k of top-k accuracy."""
    every_epochs: int = 1
    """Evaluate on the validation set every this many whole epochs (0 = only at the end)."""

    def __post_init__(self):
        _check(self.batch_size > 0, "eval.batch_size", "must be positive")
        _check(self.topk >= 5, "eval.topk", "must be >= 5 (top-5 accuracy)")
        _check(self.every_epochs >= 0, "eval.every_epochs", "must be >= 0")


PREDICTIONS = ("crossfit", "final")
ONLINE_EM = ("step", "converge")
MODES = ("staged", "online", "online_loss")


@dataclass(kw_only=True, slots=True)
class ExperimentConfig:
    knn_k: int = 5
    """K nearest categories per class (`megaclass semantics --k`)."""
    encoder: str | None = None
    """Text encoder for semantics (None: the shipped all-MiniLM-L6-v2)."""
    predictions: str = "final"
    """Where the predictions on the training images that stage 1 and stage 2 weigh come from.
    `final` (the default): the stage's own model, trained on every image, predicts them (no extra
    training). `crossfit`: the training images are split into `folds` disjoint folds (seeded by
    train.seed, stratified by label); for each, a model trained like the stage's own on the other folds
    predicts it, so no image is predicted by a model that saw its label; costs `folds` extra trainings
    on (folds - 1)/folds of the data per stage. On the demo's data `final` measured better (weights'
    AUC and top-1, docs/weighting.md "Honest predictions"): the half-data fold models are too weak."""
    folds: int = 2
    """Folds of `predictions: crossfit` (at least 2)."""
    mode: str = "staged"
    """`staged`: the seed's three trainings (baseline, +Stage1, +Stage1+Stage2), each weighted by the
    previous one's predictions. `online`: one training whose weights are re-estimated at each epoch end
    from the rank, the page text and the training forward passes' predictions (megaclass.engine.online).
    `online_loss`: one training weighted by the per-image loss alone (DivideMix's signal)."""
    warmup_epochs: int = 1
    """online modes: epochs trained on the start weights before the forward passes' views are collected."""
    online_epochs: float | None = None
    """online modes: epochs of their one training (None: `train.epochs`). The staged experiment costs three
    trainings and two prediction passes, so an online training of up to 0.4 × (3 × epochs + 2) epochs
    stays within 0.4 × its image-steps (10 for the demo's 8)."""
    online_text: bool = True
    """online: false leaves out the page text (stage 2's evidence): rank and predictions only, as stage 1,
    to measure what the text adds inside one training."""
    online_em: str = "step"
    """online: how far each re-estimate moves once the model's views are in. `step`: one EM step from the
    weights in use (online EM: each epoch's new evidence advances the estimate by a step); `converge`:
    EM to its fixed point at every re-estimate, which a young model's views can pull to a wrong one."""
    oracle: bool = False
    """Also train the clean-only oracle: the same config with weight 1 for every clean and 0 for every
    noisy training image, from `data.root/truth_train.tsv` (synthetic data only; an error when absent)."""

    def __post_init__(self):
        _check(self.knn_k > 0, "experiment.knn_k", "must be positive")
        _check(self.predictions in PREDICTIONS, "experiment.predictions",
               f"must be one of {', '.join(PREDICTIONS)}, got {self.predictions!r}")
        _check(self.mode in MODES, "experiment.mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        _check(self.warmup_epochs >= 0, "experiment.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _check(self.online_epochs is None or self.online_epochs > 0, "experiment.online_epochs",
               f"must be positive or null, got {self.online_epochs}")
        _check(self.online_em in ONLINE_EM, "experiment.online_em",
               f"must be one of {', '.join(ONLINE_EM)}, got {self.online_em!r}")
        _check(self.folds >= 2, "experiment.folds", f"must be at least 2 (one to predict, one to train on), got {self.folds}")


# Keys of the generated DeepSpeed config that the `deepspeed:` section may not set.
_GENERATED_DS_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                      "optimizer", "scheduler", "zero_optimization.stage", "gradient_clipping", "bf16.enabled",
                      "fp16.enabled")


@dataclass(kw_only=True, slots=True)
class Config:
    run_dir: str = "runs/default"
    """Where checkpoints, logs, predictions and results go."""
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    deepspeed: dict = field(default_factory=dict)
    """Extra DeepSpeed settings merged over the generated config (e.g. zero_optimization.offload_optimizer)."""

    def __post_init__(self):
        _check(bool(self.run_dir), "run_dir", "must not be empty")
        _check(self.head.optimizer is not None or self.optim.name in HEAD_OPTIMIZERS, "head.optimizer",
               f"optim.name is {self.optim.name}, whose trust ratio is a norm per parameter tensor; the head's tensors "
               f"are per-rank shards, so its training would depend on the number of ranks. Set head.optimizer to one "
               f"of {', '.join(HEAD_OPTIMIZERS)} (the backbone keeps {self.optim.name})")
        for dotted in _GENERATED_DS_KEYS:
            node = self.deepspeed
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            _check(node is None, f"deepspeed.{dotted}", "is generated by megaclass; set it through train.*, optim.*, "
                   "parallel.* instead")
        _check(self.experiment.mode == "staged" or self.parallel.pipeline_stages == 1, "experiment.mode",
               f"{self.experiment.mode} scores each training batch with the head beside the backbone's data-parallel "
               f"ranks; with parallel.pipeline_stages {self.parallel.pipeline_stages} use experiment.mode staged")
        universal = self.deepspeed.get("checkpoint")
        _check(not isinstance(universal, dict) or "load_universal" not in universal, "deepspeed.checkpoint.load_universal",
               "is set by megaclass for the one load that needs it (a ZeRO checkpoint resumed at another world size, "
               "converted to a universal checkpoint first); megaclass's own checkpoints are not universal ones")

    def deepspeed_config(self) -> dict:
        """The DeepSpeed config dict for the backbone's engine (the optimizer is built by megaclass)."""
        ds: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": self.train.micro_batch_size,
            "gradient_accumulation_steps": self.train.grad_accum,
            "zero_optimization": {"stage": self.parallel.zero_stage},
            "gradient_clipping": self.optim.grad_clip,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if self.parallel.precision == "bf16":
            ds["bf16"] = {"enabled": True}
        if self.parallel.zero_stage > 0:
            ds["zero_allow_untested_optimizer"] = True
        return _merge(ds, self.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _build(cls, values: Any, path: str):
    """Build dataclass `cls` from a mapping, recursively; unknown keys and wrong types name their path."""
    if not isinstance(values, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; valid keys{' of ' + path if path else ''}: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        key = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(hints[name], value, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None


_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _coerce(hint, value, key):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        return _coerce(hint, value, key)
    if hint is bool:
        _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
    elif hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads `1e-4` as a string; YAML 1.2 and OmegaConf a float
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float's range
            value = math.inf
        _check(math.isfinite(value), key, f"must be a finite number, got {value}")
    elif hint is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
    elif hint is dict:
        _check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
    elif origin is tuple:
        _check(isinstance(value, (list, tuple)) and len(value) == len(args), key, f"expected {len(args)} values, got {value!r}")
        value = tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    return value


def _apply_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value (e.g. train.epochs=2)")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML: {exc}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from the defaults), apply `key=value` overrides, validate."""
    tree: dict = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                tree = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deep to be a config") from None
        if tree is None:  # an empty file: the defaults
            tree = {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...), "
                              f"got a {type(tree).__name__}")
    for assignment in overrides:
        _apply_override(tree, assignment)
    try:
        return _build(Config, tree, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def config_from_dict(tree: dict) -> Config:
    return _build(Config, tree, "")
