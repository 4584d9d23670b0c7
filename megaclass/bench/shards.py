"""`megaclass bench shards`: `megaclass shards` conversion rate (images/s) at three data set sizes, and the
class histogram of a class-balanced epoch on shards beside the file path's.

The data: `--pool` distinct photo-like JPEGs of 256 px on the short side (WebVision's resized release;
about 40 kB each), hard-linked into a WebVision layout of N images with query metadata JSON (so the
conversion reads, checks and writes N files' bytes while the disk holds only the pool). The time is the
whole `convert` call: the metadata reader, the image header checks, the tar writing and fsyncs.
Target: at least 2,000 images/s on 2 cores (`--workers 2`). Also reported: images per CPU-second (user +
system time of the command and its workers), which a loaded machine does not distort.

`--startup SIZES` measures instead what a training rank pays at start-up to read a shard folder
(`load_shards`): wall and CPU seconds and the rise of peak RSS, each in a fresh process, for folders of N
16-px JPEGs (~0.7 kB; the cost is per sample, not per byte) in shards of 10,000, read three ways: through
the sample indexes ("index"), by scanning the same tars without them ("scan", the fallback for folders
written before indexes), and with `--compare-with DIR` by the `load_shards` of the megaclass source tree
at DIR ("before": e.g. `git archive` of an older commit), on the same folder.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from megaclass.argtypes import output_file, positive_int
from megaclass.bench.ranks import machine


def register(subparsers) -> None:
    parser = subparsers.add_parser("shards", help="`megaclass shards` images/s at three sizes; class-balanced histogram",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,8000,32000", help="images per data set (default 2000,8000,32000)")
    parser.add_argument("--workers", type=positive_int, default=2, help="conversion processes (default 2)")
    parser.add_argument("--per-shard", type=positive_int, default=1000, help="records per shard (default 1000)")
    parser.add_argument("--pool", type=positive_int, default=200, help="distinct JPEGs (default 200)")
    parser.add_argument("--classes", type=positive_int, default=100, help="classes (default 100)")
    parser.add_argument("--out", type=output_file, default=None, metavar="FILE.json", help="also write the results here")
    parser.add_argument("--plot", type=output_file, default=None, metavar="FILE.png",
                        help="also plot seconds against images, log-log, with the 2,000 images/s target line")
    parser.add_argument("--startup", default=None, metavar="SIZES",
                        help="instead: load_shards' start-up time and peak memory at these sizes, e.g. 20000,80000,320000")
    parser.add_argument("--compare-with", default=None, metavar="DIR",
                        help="with --startup: also time the load_shards of the megaclass source tree at DIR")
    parser.set_defaults(func=run)


def plot(result: dict, path) -> None:
    """Conversion seconds against images (log-log): wall time, CPU-seconds / 2 (what
    2 free cores would take), and the target's 2,000 images/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megaclass.io import atomic_output

    n = np.array([r["images"] for r in result["conversion"]], dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.loglog(n, [r["seconds"] for r in result["conversion"]], "o-", label=f"wall (load average {result['machine']['load_average_1min_at_start']} at start)")
    ax.loglog(n, [r["cpu_seconds"] / 2 for r in result["conversion"]], "s-", label="CPU-seconds / 2 cores")
    ax.loglog(n, n / result["target_images_per_s"], "k--", label="target: 2,000 images/s")
    ax.set_xticks(n, [f"{int(v):,}" for v in n])
    ax.minorticks_off()
    ax.set_xlabel("images converted")
    ax.set_ylabel("seconds")
    ax.set_title(f"megaclass shards, --workers {result['workers']}, 256-px JPEGs", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _photo(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A smooth colour field plus texture: JPEG sizes like a photo's, not like flat colour or noise."""
    y, x = np.mgrid[0:size, 0:size * 4 // 3] / size
    base = [np.sin(x * rng.uniform(1, 6) + rng.uniform(0, 6)) + np.cos(y * rng.uniform(1, 6)) for _ in range(3)]
    image = np.stack(base, -1) * 60 + 128 + rng.normal(0, 18, (size, size * 4 // 3, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_layout(root: Path, n: int, pool: list[Path], classes: int) -> list[tuple[str, int]]:
    """A WebVision layout of `n` training images (hard links to the pool), one query per class; returns
    each image's (path relative to root, label)."""
    (root / "info").mkdir(parents=True)
    (root / "info" / "synsets.txt").write_text("".join(f"n{10_000_000 + c:08d} class {c}\n" for c in range(classes)))
    lines, per_query, items = [], {}, []
    for i in range(n):
        c = i % classes
        rel = f"google/q{c + 1:04d}/{i}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(pool[i % len(pool)], root / rel)
        lines.append(f"{rel} {c}\n")
        items.append((rel, c))
        per_query.setdefault(c, []).append({"id": str(i), "rank": len(per_query.get(c, [])) + 1,
                                            "title": f"photo {i} of class {c}", "description": "a web image " * 8})
    (root / "info" / "train_filelist_google.txt").write_text("".join(lines))
    for c, entries in per_query.items():
        (root / "google" / f"q{c + 1:04d}.json").write_text(json.dumps(entries))
    return items


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the conversion's workers): on a
    machine shared with other work, what the conversion costs, whatever share of the cores it got."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _histograms(classes: int = 100, epochs: int = 20) -> dict:
    """Class shares of class-balanced epochs on shards and on files, for a long-tailed label set grouped
    by shard (a web filelist grouped by query)."""
    import torch

    from megaclass.data import ClassBalancedSampler
    from megaclass.data.shards import shard_epoch_order

    counts = np.maximum(1, (400 / (1 + np.arange(classes)) ** 1.0).astype(int))  # 400 .. 4 images
    labels = torch.from_numpy(np.repeat(np.arange(classes), counts))
    sizes = [1000] * (len(labels) // 1000) + ([len(labels) % 1000] if len(labels) % 1000 else [])
    shard, files = np.zeros(classes), np.zeros(classes)
    for epoch in range(epochs):
        shard += np.bincount(labels[shard_epoch_order(sizes, 0, epoch, 1000, labels)].numpy(), minlength=classes)
        sampler = ClassBalancedSampler(labels.tolist(), seed=0)
        sampler.set_epoch(epoch)
        files += np.bincount(labels[list(sampler)].numpy(), minlength=classes)

    def stats(h):
        share = h / h.sum()
        return {"min_share": float(share.min()), "max_share": float(share.max()),
                "relative_std": float(share.std() / share.mean())}

    return {"images": len(labels), "classes": classes, "epochs": epochs, "largest_class": int(counts[0]),
            "smallest_class": int(counts[-1]), "uniform_share": 1 / classes, "shards": stats(shard), "files": stats(files),
            "shards_histogram": shard.astype(int).tolist(), "files_histogram": files.astype(int).tolist()}


_LOAD = textwrap.dedent("""\
    import json, re, resource, sys, time
    from megaclass.data.shards import load_shards

    def kib(field):
        return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

    rss = kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # peak RSS (VmHWM) restarts here: the imports' peak is not counted
        f.write("5")
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    shards = load_shards(sys.argv[1])
    seconds, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"samples": sum(sum(v) for v in shards.sizes.values()), "seconds": seconds,
                      "cpu_seconds": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
                      "peak_rss_rise": (kib("VmHWM") - rss) * 1024, "rss_rise": (kib("VmRSS") - rss) * 1024,
                      "column_bytes": sum(c.nbytes for c in getattr(shards, "columns", {}).values())}))
    """)


def _load_in_fresh_process(folder: Path, code: Path) -> dict:
    """load_shards(folder) with the megaclass at `code` (first on the path: the command runs outside any
    source tree), in a process of its own (Linux: its peak RSS from /proc/self)."""
    done = subprocess.run([sys.executable, "-c", _LOAD, str(folder)], env={**os.environ, "PYTHONPATH": str(code)},
                          cwd=folder, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def startup(args) -> int:
    """`--startup`: load_shards through the sample indexes, by the scan, and (--compare-with) by other code."""
    from PIL import Image

    machine_info = machine()  # before the benchmark's own load

    import megaclass
    from megaclass.data.shards import convert
    from megaclass.io import atomic_write_text

    here = Path(megaclass.__file__).resolve().parents[1]
    codes = {"index": here, "scan": here}
    if args.compare_with:
        codes["before"] = Path(args.compare_with).resolve()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        rng = np.random.default_rng(0)
        pool = []
        for i in range(20):
            pool.append(Path(tmp) / f"{i}.jpg")
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(pool[-1], quality=90)
        for n in [int(s) for s in args.startup.split(",")]:
            root, out, scan = Path(tmp) / "data", Path(tmp) / "shards", Path(tmp) / "scan"
            write_layout(root, n, pool, args.classes)
            convert(root, out, per_shard=10_000, workers=args.workers, progress=False)
            shutil.rmtree(root)
            scan.mkdir()  # the same tars, an index.json without sample indexes
            index = json.loads((out / "index.json").read_text())
            for split in index["splits"].values():
                for shard in split["shards"]:
                    del shard["index"]
                    os.link(out / shard["name"], scan / shard["name"])
            (scan / "index.json").write_text(json.dumps(index))
            for how, code in codes.items():
                got = _load_in_fresh_process(scan if how == "scan" else out, code)
                got.update(how=how, cpu_ms_per_sample=got["cpu_seconds"] / got["samples"] * 1e3,
                           bytes_per_sample=got["peak_rss_rise"] / got["samples"])
                rows.append(got)
                print(f"{got['samples']:>9} samples  {how:>6}  {got['seconds']:7.2f} s  {got['cpu_seconds']:7.2f} CPU-s "
                      f"({got['cpu_ms_per_sample']:.4f} ms a sample)  peak RSS +{got['peak_rss_rise'] / 2**20:7.1f} MiB "
                      f"({got['bytes_per_sample']:.0f} B a sample; held after: {got['rss_rise'] / 2**20:.1f} MiB; "
                      f"columns {got['column_bytes'] / got['samples']:.0f} B a sample)",
                      flush=True)
            shutil.rmtree(out)
            shutil.rmtree(scan)
    largest = max(r["samples"] for r in rows)
    at_16m = {r["how"]: {"cpu_seconds": r["cpu_ms_per_sample"] * 16e3, "peak_rss_rise_gib": r["bytes_per_sample"] * 16e6 / 2**30}
              for r in rows if r["samples"] == largest}
    for how, x in at_16m.items():
        print(f"extrapolated to 16M samples from {largest:,} ({how}): {x['cpu_seconds']:.0f} CPU-s, "
              f"peak RSS +{x['peak_rss_rise_gib']:.2f} GiB")
    if args.out:
        result = {"benchmark": "shards startup", "machine": machine_info,
                  "per_shard": 10_000, "rows": rows, "extrapolated_to_16M": at_16m}
        atomic_write_text(args.out, json.dumps(result, indent=1))
    return 0


def run(args) -> int:
    from PIL import Image

    if args.startup:
        return startup(args)
    machine_info = machine()  # before the benchmark's own load

    from megaclass.data.shards import convert
    from megaclass.io import atomic_write_text

    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        rng = np.random.default_rng(0)
        pool = []
        for i in range(args.pool):
            path = Path(tmp) / "pool" / f"{i}.jpg"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(_photo(rng)).save(path, quality=90)
            pool.append(path)
        jpeg_bytes = float(np.mean([p.stat().st_size for p in pool]))
        for n in sizes:
            root, out = Path(tmp) / f"data-{n}", Path(tmp) / f"shards-{n}"
            write_layout(root, n, pool, args.classes)
            cpu0, t0 = _cpu_seconds(), time.perf_counter()
            index = convert(root, out, per_shard=args.per_shard, workers=args.workers, progress=False)
            seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
            assert index["splits"]["train"]["samples"] == n
            rows.append({"images": n, "seconds": seconds, "images_per_s": n / seconds, "cpu_seconds": cpu,
                         "images_per_cpu_s": n / cpu, "shards": len(index["splits"]["train"]["shards"])})
            print(f"{n:>8} images  {seconds:7.2f} s  {n / seconds:8.0f} images/s  "
                  f"({n / cpu:6.0f} images per CPU-second)", flush=True)
            shutil.rmtree(root)
            shutil.rmtree(out)
    result = {"benchmark": "shards", "machine": machine_info,
              "workers": args.workers, "per_shard": args.per_shard, "mean_jpeg_bytes": jpeg_bytes,
              "target_images_per_s": 2000, "conversion": rows, "class_balanced": _histograms()}
    cb = result["class_balanced"]
    for name in ("shards", "files"):
        s = cb[name]
        print(f"class-balanced on {name}: class share min {s['min_share']:.4f} max {s['max_share']:.4f} "
              f"(uniform {cb['uniform_share']:.4f}), relative std {s['relative_std']:.3f}")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    return 0
