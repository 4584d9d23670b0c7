"""`megaclass bench input`: images/s per core of the training transform, and what one rank of the model eats.

The transform is the trainer's (`ImageDataset`'s at --image-size, train=True): decode, RandomResizedCrop,
horizontal flip, float, normalize. Inputs are --images photo-like JPEGs (1/f colour noise, 256 px on the
short side, ~40 kB each, like WebVision's resized release), generated here with a fixed seed, and read
  memory       from bytes already in RAM: the limit of the decode + transform. Two decoders: PIL (the path
               before issue 18) and megaclass.data.decode.decode_image (libjpeg-turbo via decode_jpeg);
               also each decoder alone, without the transform ("decode-only")
  files        one file per image of a WebVision layout through ImageDataset (page cache warm)
  shards       that layout converted by `megaclass shards` (--per-shard samples each), read by the
               training reader (ShardDataset: the sample index, one pread per image) in training's
               order (shards shuffled, then a shuffle buffer); and the reading alone ("shards-read-only")
  webdataset   the same tars read sequentially by webdataset's reference reader (every member's
               header parsed, KEY.json decoded), for comparison; and its reading alone
The shard rows are left out where webdataset (the converter's tar writer) is not installed.
Each source runs in this one process with one intra-op thread, --rounds times interleaved; the best round
is reported as images per CPU-second ("per core": robust on a shared machine) and per wall-second. The
shard reader's overhead is its per-image CPU cost over the from-memory one (target <= 10 %; and >= 600
images/s per core from shards).

Beside them: the images/s that one rank of --model (default resnext101_32x8d, timm, random init) consumes
in a training step (forward + backward + SGD, --batch images of --image-size px, all CPU threads), and so
how many decode cores one rank needs. With --device cuda (.ci/gpu-check) the model step runs on the GPU
(bf16 autocast, --gpu-batch) instead, and GPU decoding (`decode_jpeg(device="cuda")`, batched) is
measured too, alone and with the transform on the GPU; its pixels are compared with PIL's.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from megaclass.argtypes import nonnegative_int, output_file, output_folder, positive_int
from megaclass.bench.ranks import machine
from megaclass.io import atomic_write_text

TARGET_PER_CORE = 600
TARGET_OVERHEAD = 0.10
CLASSES = 1000


def register(subparsers) -> None:
    p = subparsers.add_parser("input", help="images/s per core of the training transform from memory, files and "
                                            "tar shards, beside one rank's ResNeXt101 step",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=positive_int, default=300, help="JPEGs generated and read (default 300)")
    p.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds per source; best reported (default 5)")
    p.add_argument("--per-shard", type=positive_int, default=100, help="samples per tar shard (default 100)")
    p.add_argument("--image-size", type=positive_int, default=224, help="crop side of the transform and the model (default 224)")
    p.add_argument("--model", default="resnext101_32x8d", help="backbone whose step is timed (default resnext101_32x8d)")
    p.add_argument("--batch", type=positive_int, default=4, help="images per CPU model step (default 4)")
    p.add_argument("--gpu-batch", type=positive_int, default=64, help="images per GPU model step (default 64)")
    p.add_argument("--steps", type=positive_int, default=2, help="timed model steps; the median is reported (default 2)")
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed model steps first (default 1)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: also GPU decoding, and the model step on the GPU instead of the CPU (default cpu)")
    p.add_argument("--work", type=output_folder, default=None, metavar="DIR",
                   help="where the files and shards are written (default: a temporary folder, removed after)")
    p.add_argument("--json", type=output_file, default=None, metavar="OUT", help="also write the results as JSON to OUT")
    p.set_defaults(func=run)


def photo_jpegs(count: int, seed: int = 0, quality: int = 85) -> list[bytes]:
    """`count` JPEGs with a natural image's 1/f amplitude spectrum in correlated colour channels, 256 px on
    the short side and 256-399 px on the long one (30 % portrait), 4:2:0 at `quality`: ~40 kB each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        h, w = 256, int(rng.integers(256, 400))
        if rng.random() < 0.3:
            h, w = w, h
        fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
        amplitude = np.hypot(fy, fx)
        amplitude[0, 0] = 1.0
        amplitude **= -1.1
        planes = [np.fft.irfft2(amplitude * np.exp(2j * np.pi * rng.random(amplitude.shape)), s=(h, w)) for _ in range(3)]
        x = np.stack(planes, -1) @ (np.eye(3) + 0.3 * rng.normal(size=(3, 3)))
        x = 128 + 50 * (x - x.mean()) / x.std() + rng.normal(0, 3, x.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def pil_decode(data: bytes) -> torch.Tensor:
    """The decode of the file path before issue 18: PIL, convert("RGB"), uint8 [3, H, W]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def images_as_webvision(images: list[bytes], root: Path) -> list[tuple[str, int]]:
    """The images as a WebVision layout under `root` (`megaclass.bench.shards.write_layout`, one query per
    class of 1,000); the (path, label) items ImageDataset reads."""
    from megaclass.bench.shards import write_layout

    (root / "pool").mkdir(parents=True, exist_ok=True)
    pool = []
    for i, data in enumerate(images):
        pool.append(root / "pool" / f"{i:06d}.jpg")
        pool[-1].write_bytes(data)
    return write_layout(root, len(images), pool, CLASSES)


def read_shards(urls: list[str]) -> Iterator[tuple[str, bytes, int, str]]:
    """(key, image bytes, label, original path) of every sample, shard after shard, read sequentially by
    webdataset (`tarfile_samples`): the field's reference reader, for comparison with the indexed one."""
    from webdataset.tariterators import tarfile_samples

    for sample in tarfile_samples([{"url": url} for url in urls]):
        yield sample["__key__"], sample["jpg"], int(sample["cls"]), json.loads(sample["json"])["path"]


def _measure(sources: dict, rounds: int) -> dict:
    """{name: {images_per_cpu_s, images_per_s}}: the best of `rounds` interleaved rounds of each source, after
    an untimed one (imports, page cache), with one intra-op thread. A source is a function that runs the whole
    transform over every image once and returns the count."""
    best = {name: {"images_per_cpu_s": 0.0, "images_per_s": 0.0} for name in sources}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for source in sources.values():
            source()
        for round_ in range(rounds):
            for name, source in sources.items():
                torch.manual_seed(round_)
                cpu, wall = time.process_time(), time.perf_counter()
                count = source()
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                best[name]["images_per_cpu_s"] = max(best[name]["images_per_cpu_s"], count / cpu)
                best[name]["images_per_s"] = max(best[name]["images_per_s"], count / wall)
    finally:
        torch.set_num_threads(threads)
    return best


def model_step(name: str, batch: int, image_size: int, steps: int, warmup: int, device: str) -> dict:
    """Median training step (forward + backward + SGD, a 1,000-class linear head) of one rank."""
    from megaclass.models import build_backbone

    backbone = build_backbone(name, seed=0)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.num_features, 1000)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(1000, (batch,), generator=generator).to(device)
    if device == "cuda":
        model, images = model.to(memory_format=torch.channels_last), images.to(memory_format=torch.channels_last)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"model": name, "device": device, "batch": batch, "image_size": image_size,
            "threads": torch.get_num_threads() if device == "cpu" else None,
            "dtype": "bf16 autocast" if device == "cuda" else "fp32", "step_s": step_s, "images_per_s": batch / step_s}


def gpu_decode(images: list[bytes], transform, batch: int, rounds: int) -> dict:
    """decode_jpeg(device="cuda") over the images in batches, alone and with the transform on the GPU (per
    image, as the CPU path); its pixels against PIL's (nvJPEG's IDCT and upsampling may differ by a few levels)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in images]

    def decode():
        out = []
        for start in range(0, len(encoded), batch):
            out += decode_jpeg(encoded[start:start + batch], mode=ImageReadMode.RGB, device="cuda")
        return out

    def with_transform():
        return [transform(x) for x in decode()]

    result = {"batch": batch}
    for name, fn in (("decode", decode), ("decode_transform", with_transform)):
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        result[f"{name}_images_per_s"] = len(images) / best
    diffs = [(x.cpu().int() - pil_decode(d).int()).abs().max().item() for x, d in zip(decode(), images)]
    result.update(max_abs_diff_vs_pil=max(diffs), images_equal_to_pil=sum(d == 0 for d in diffs))
    return result


def bench(args, work: Path) -> dict:
    from megaclass.data import ImageDataset
    from megaclass.data.decode import decode_image
    from megaclass.data.shards import ShardDataset, convert, load_shards, shard_epoch_order

    machine_info = machine(args.device)  # before the benchmark's own load
    images = photo_jpegs(args.images)
    items = images_as_webvision(images, work / "webvision")
    try:
        convert(work / "webvision", work / "shards", args.per_shard, progress=False)
    except ImportError:  # no webdataset: the GPU image unless .whl/ brings it (make gpu-wheels); the rest still runs
        shards = None
    else:
        shards = ShardDataset(load_shards(work / "shards"), "train", args.image_size, train=True)
    files = ImageDataset(work / "webvision", items, args.image_size, train=True)
    transform = files.transform
    # the order training reads in: shards shuffled, then a shuffle buffer (files read in the same order)
    order = shard_epoch_order(shards.sizes if shards else [len(items)], 0, 0, buffer=args.per_shard).tolist()

    def from_memory(decoder):
        return lambda: sum(1 for data in images if transform(decoder(data)) is not None)

    sources = {"decode-only/pil": lambda: sum(1 for data in images if pil_decode(data) is not None),
               "decode-only": lambda: sum(1 for data in images if decode_image(data, "memory") is not None),
               "memory/pil": from_memory(pil_decode),
               "memory": from_memory(lambda data: decode_image(data, "memory")),
               "files": lambda: sum(1 for i in order if files[i] is not None)}
    if shards:
        tars = [str(path) for path in shards.files]
        sources["shards"] = lambda: sum(1 for i in order if shards[i] is not None)
        sources["shards-read-only/none"] = lambda: sum(1 for i in order if shards._encoded(i))
        sources["webdataset"] = lambda: sum(1 for key, data, _, _ in read_shards(tars)
                                            if transform(decode_image(data, key)) is not None)
        sources["webdataset-read-only/none"] = lambda: sum(1 for _ in read_shards(tars))
    rates = _measure(sources, args.rounds)
    rows = [{"source": name.split("/")[0], "decoder": name.split("/")[1] if "/" in name else "decode_image", **rate}
            for name, rate in rates.items()]
    per_core = {name: rate["images_per_cpu_s"] for name, rate in rates.items()}
    feed = per_core.get("shards", per_core["files"])  # the source one rank's decode cores are counted in
    overhead = per_core["memory"] / per_core["shards"] - 1 if shards else None
    equal = sum(torch.equal(decode_image(data, "memory"), pil_decode(data)) for data in images)
    result = {
        "machine": machine_info,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        "jpeg_mean_bytes": round(statistics.mean(len(d) for d in images)),
        "shard_bytes_per_image": round(sum(p.stat().st_size for p in shards.files) / len(images)) if shards else None,
        "decoded_equal_to_pil": {"images": len(images), "equal": equal},
        "input": rows,
        "shard_overhead_vs_memory": overhead,
        "targets": {"shards_images_per_core_s": [TARGET_PER_CORE, shards and per_core["shards"] >= TARGET_PER_CORE],
                    "shard_overhead_vs_memory": [TARGET_OVERHEAD, shards and overhead <= TARGET_OVERHEAD]},
        "decode_cores_from": "shards" if shards else "files; webdataset is not installed",
    }
    batch = args.gpu_batch if args.device == "cuda" else args.batch
    result["model"] = model_step(args.model, batch, args.image_size, args.steps, args.warmup, args.device)
    result["decode_cores_per_rank"] = result["model"]["images_per_s"] / feed
    if args.device == "cuda":
        result["gpu_decode"] = gpu_decode(images, transform, args.gpu_batch, args.rounds)
    return result


def run(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("megaclass bench input: --device cuda, but torch sees no CUDA GPU")
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="bench-input-") as tmp:
            result = bench(args, Path(tmp))
    else:
        result = bench(args, args.work)
    in_shards = result["shard_bytes_per_image"]
    print(f"{args.images} JPEGs, {result['jpeg_mean_bytes'] / 1e3:.1f} kB mean ("
          + (f"{in_shards / 1e3:.1f} kB per image in the shards, tar headers and json included" if in_shards else
             "no shards: webdataset is not installed") + f"), transform at {args.image_size} px, "
          f"one thread, best of {args.rounds} rounds; decode_image's pixels equal PIL's for "
          f"{result['decoded_equal_to_pil']['equal']} of {args.images}")
    print("| source | decoder | images/s per core (CPU time) | images/s (wall) |\n| --- | --- | ---: | ---: |")
    for row in result["input"]:
        print(f"| {row['source']} | {row['decoder']} | {row['images_per_cpu_s']:.0f} | {row['images_per_s']:.0f} |")
    if result["shard_overhead_vs_memory"] is not None:
        print(f"shard reader overhead vs memory: {100 * result['shard_overhead_vs_memory']:+.1f} % "
              f"(target <= {100 * TARGET_OVERHEAD:.0f} %); target >= {TARGET_PER_CORE} images/s per core from shards")
    m = result["model"]
    print(f"{m['model']} training step on {m['device']} ({m['dtype']}, batch {m['batch']}, {m['image_size']} px"
          f"{', %d threads' % m['threads'] if m['threads'] else ''}): {m['step_s']:.2f} s, {m['images_per_s']:.1f} images/s"
          f" = {result['decode_cores_per_rank']:.2g} decode cores (from {result['decode_cores_from']}) per rank")
    if "gpu_decode" in result:
        g = result["gpu_decode"]
        print(f"GPU decode_jpeg(device='cuda'), batches of {g['batch']}: {g['decode_images_per_s']:.0f} images/s, "
              f"with the transform {g['decode_transform_images_per_s']:.0f} images/s; pixels equal to PIL's for "
              f"{g['images_equal_to_pil']} of {args.images} (max difference {g['max_abs_diff_vs_pil']})")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
    return 0
