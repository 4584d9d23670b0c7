"""`megaclass bench train`: training images/s and peak memory, megaclass against plain PyTorch DDP.

Both variants train the same backbone on the same in-memory batches over P gloo/nccl ranks:
  megaclass  backbone under a DeepSpeed engine + the class-sharded fused head (`Trainer.train_step`)
  ddp        DistributedDataParallel(backbone + nn.Linear(D, C)) + F.cross_entropy (weighted mean)
Each variant runs in fresh processes. Memory is the peak per rank (CUDA: max allocated; CPU: peak
resident set) and, on CPU, the growth of that peak over the process before the model was built,
with the same libraries (DeepSpeed, timm, torchvision) imported in both: what training adds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from megaclass.argtypes import nonnegative_int, output_file, positive_int
from megaclass.io import atomic_write_text


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="training images/s and peak memory against plain DDP",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=positive_int, nargs="+", default=[10_000, 200_000], help="class counts to compare")
    p.add_argument("--ranks", type=positive_int, default=2, help="processes (ranks) per variant")
    p.add_argument("--model", default="resnet10t", help="backbone (megaclass.models name or timm name)")
    p.add_argument("--image-size", type=positive_int, default=32, help="square image side")
    p.add_argument("--batch", type=positive_int, default=64, help="images per rank per step")
    p.add_argument("--steps", type=positive_int, default=6, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed steps first")
    p.add_argument("--out", type=output_file, default=None, help="also write the table as JSON here")
    p.set_defaults(func=run)


def _batches(args, classes, rank, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + rank)
    n = args.warmup + args.steps
    images = torch.randn(n, args.batch, 3, args.image_size, args.image_size, generator=g)
    labels = torch.randint(classes, (n, args.batch), generator=g)
    weights = torch.rand(n, args.batch, generator=g)
    return [(images[i], labels[i], weights[i]) for i in range(n)]


def worker(spec: dict) -> dict:
    """One rank of one variant (run by `megaclass.bench.ranks.launch`)."""
    import argparse
    import importlib

    rank, world, variant, classes = spec["rank"], spec["world"], spec["variant"], spec["classes"]
    args = argparse.Namespace(**spec["args"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import torch

    for module in ("megaclass.engine.trainer", "megaclass.models"):  # DeepSpeed, timm, torchvision:
        importlib.import_module(module)  # the same libraries in both variants before `before`
    from megaclass.engine import distributed
    from megaclass.engine.config import config_from_dict
    from megaclass.memory import peak_memory_bytes

    cfg = config_from_dict({"model": {"name": args.model}, "train": {"micro_batch_size": args.batch, "progress": False},
                            "optim": {"name": "sgd", "lr": 0.01, "schedule": "constant"}, "data": {"num_workers": 0}})
    distributed.init(cfg)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    batches = _batches(args, classes, rank)
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    before = peak_memory_bytes(device) / 2**20
    step = (_megaclass_step if variant == "megaclass" else _ddp_step)(cfg, classes, device, world)
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = peak_memory_bytes(device) / 2**20
    distributed.finish()
    return {"step_s": statistics.median(times), "peak_mb": peak, "train_mb": peak - before if device.type == "cpu" else peak}


def _megaclass_step(cfg, classes, device, world):
    import torch
    from torch.utils.data import TensorDataset

    from megaclass.engine.trainer import TrainData, Trainer
    from megaclass.models import build_backbone

    micro = cfg.train.micro_batch_size
    # The trainer reads only the length of the data set (the schedule); batches are fed directly.
    placeholder = TensorDataset(torch.zeros(world * micro))
    trainer = Trainer(cfg, TrainData(placeholder, classes, torch.zeros(world * micro, dtype=torch.long)),
                      backbone=build_backbone(cfg.model.name, seed=0))
    index = torch.arange(micro)

    def step(batch):
        images, target, sample_weights = batch
        trainer.data.sample_weights = sample_weights  # indexed by `index`: this batch's weights
        trainer.train_step(iter([(images, target, index)]))

    return step


def _ddp_step(cfg, classes, device, world):
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from megaclass.models import build_backbone

    backbone = build_backbone(cfg.model.name, seed=0)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.num_features, classes)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step(batch):
        images, target, weights = (t.to(device) for t in batch)
        loss = (weights * F.cross_entropy(ddp(images), target, reduction="none")).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure(variant: str, classes: int, args) -> dict:
    """Run one variant on `args.ranks` fresh processes; the slowest rank's time, the largest memory."""
    from megaclass.bench.ranks import launch

    spec = {"variant": variant, "classes": classes, "args": {k: v for k, v in vars(args).items() if k != "func"}}
    results = launch("megaclass.bench.train:worker", spec, args.ranks)
    step = max(r["step_s"] for r in results)
    return {"images_per_s": args.ranks * args.batch / step, "peak_mb": max(r["peak_mb"] for r in results),
            "train_mb": max(r["train_mb"] for r in results)}


def run(args) -> int:
    import json

    rows = []
    print(f"{args.model}, {args.image_size}px, {args.batch} images/rank/step, {args.ranks} ranks, "
          f"median of {args.steps} steps", flush=True)
    header = "| classes | variant | images/s | peak MB/rank | training MB/rank |"
    lines = [header, "| ---: | --- | ---: | ---: | ---: |"]
    for classes in args.classes:
        for variant in ("ddp", "megaclass"):
            r = measure(variant, classes, args)
            rows.append({"classes": classes, "variant": variant, **r})
            lines.append(f"| {classes:,} | {variant} | {r['images_per_s']:.1f} | {r['peak_mb']:.0f} | {r['train_mb']:.0f} |")
            print(lines[-1], flush=True)
        ddp, mc = rows[-2], rows[-1]
        print(f"  {classes:,} classes: megaclass speed {mc['images_per_s'] / ddp['images_per_s']:.2f}x DDP, "
              f"training memory {mc['train_mb'] / max(ddp['train_mb'], 1e-9):.2f}x DDP, "
              f"peak memory {mc['peak_mb'] / max(ddp['peak_mb'], 1e-9):.2f}x DDP", flush=True)
    print("\n".join(lines))
    if args.out:
        atomic_write_text(args.out, json.dumps(rows, indent=1))
    return 0
