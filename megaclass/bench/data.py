"""`megaclass bench data`: reading metadata and both weighting stages, time and peak memory against N.

For each N, metadata-only WebVision-layout data is generated (no image files: everything is read with
`check_images=False`): C classes drawn from ImageNet-22k, one class per query and about 700 images per
query (half Google, half Flickr), titles of ~6 words, descriptions of ~25 words and Flickr tags drawn
from the WordNet noun vocabulary with Zipf frequencies plus web debris (`megaclass bench weights`'
generator), ranks 1..700 in shuffled JSON lists. Predictions (top 5) are realistic rather than random:
an image is clean with probability falling with its rank (0.85 at the top, 0.35 at rank 700), and a
clean image's top-1 is its label 70% of the time; knn.tsv gives each class 10 random neighbours.
Which images are clean is written to truth_clean.tsv: each stage's row gives the AUC of its weights
(computed after the step's time and peak are taken).

Each step runs in its own process, so that its peak RSS is its own (wall and CPU seconds are both
recorded: on a shared machine the CPU time of the step's process is the steadier figure; keyword extraction
runs in forked workers, one per CPU, whose CPU time and private memory are added to the step's): `read`
(the reader, into columns), `keywords` (keyword extraction on the columns), `stage1` and `stage2` (`megaclass weights
--stage 1`, then `--stage 2 --stage1 OUT1`, as `compute_weights` + `save_weights` run them, without
the PNG). A step's time excludes the reading it repeats; its peak RSS includes it (that is what the
command needs), and `read_peak_rss_bytes` is its peak at the end of that reading. Sizes given in `--extrapolate` are predicted, not run: each step's wall time, CPU time
and peak RSS are fitted as `fixed + per_image·N` (least squares with both terms non-negative) to the
measured sizes. A straight line, not a power law: a fixed start-up cost (Python, torch, the encoder:
~0.5 GB and seconds) makes the log-log slope of small runs well below 1 and a power law fitted to them
would under-predict 16M. The JSON gives fixed, per_image and the log-log slope between the two largest
measured sizes of each step (1 = linear growth), marks every extrapolated row `"extrapolated": true`,
and the plot draws them hollow on a dashed line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from megaclass.argtypes import nonnegative_int, output_file, positive_int
from megaclass.io import atomic_write_text
from megaclass.weighting.estimate import MAX_ITERATIONS, TOLERANCE
from megaclass.weighting.stage1 import EM_SAMPLE

STEPS = ("read", "keywords", "stage1", "stage2")
TRUTH = "truth_clean.tsv"  # `<path><TAB>1|0`: the generator's truth, for the weights' AUC
PER_QUERY = 700
TARGET_IMAGES, TARGET_SECONDS, TARGET_BYTES = 16_000_000, 1800, 10e9


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="metadata reading + weighting stages: time and peak RSS against N",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=positive_int, nargs="+", default=[1_000_000, 4_000_000],
                        metavar="N", help="sizes to generate and measure (default 1000000 4000000)")
    parser.add_argument("--classes", type=positive_int, default=5000, help="classes C (default 5000, WebVision 2.0's)")
    parser.add_argument("--extrapolate", type=positive_int, nargs="*", default=[TARGET_IMAGES], metavar="N",
                        help="sizes predicted from the measured ones, not run (default 16000000)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the generated data (default 0)")
    parser.add_argument("--work", default=None, metavar="DIR",
                        help="where the generated data goes (default a temporary folder; each size is deleted after)")
    parser.add_argument("--json", type=output_file, default=None, metavar="OUT",
                        help="write the results here, and the plot beside it (OUT with .png)")
    parser.set_defaults(func=run)


def generate(root: Path, n: int, classes: int, seed: int) -> tuple[Path, Path]:
    """Metadata-only data at `root` (module docstring) -> (knn.tsv, predictions.tsv) inside it."""
    from megaclass.bench.weights import _metadata, web_vocabulary

    rng = np.random.default_rng(seed)
    wnids, _, class_words, vocabulary = web_vocabulary(rng, classes)
    info = root / "info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "synsets.txt").write_text("".join(f"{w} {' '.join(words[:3])}\n" for w, words in zip(wnids, class_words)))
    knn = root / "knn.tsv"
    with open(knn, "w") as f:
        for c, w in enumerate(wnids):
            others = rng.choice(classes - 1, size=min(10, classes - 1), replace=False)
            for j, other in enumerate((others + (others >= c)).tolist()):  # never the class itself
                f.write(f"{w}\t{wnids[other]}\t{0.9 - 0.05 * j:.3f}\n")
    predictions = root / "predictions.tsv"
    truth = open(root / TRUTH, "w")
    filelists = {s: open(info / f"train_filelist_{s}.txt", "w") for s in ("google", "flickr")}
    query_lists = {s: open(info / f"queries_{s}.txt", "w") for s in ("google", "flickr")}
    with open(predictions, "w") as pred:
        for q in range(math.ceil(n / PER_QUERY)):
            size = min(PER_QUERY, n - q * PER_QUERY)
            source, number, label = ("google", "flickr")[q % 2], q // 2 + 1, int(rng.integers(classes))
            query = f"q{number:05d}"
            (root / source).mkdir(exist_ok=True)
            query_lists[source].write(f"{number} {class_words[label][0]}\n")
            labels = np.full(size, label)
            titles, descriptions, tags, _ = _metadata(size, class_words, vocabulary, labels, rng,
                                                      title_words=5, description_words=24, tag_words=4)
            ranks = rng.permutation(size) + 1
            clean = rng.random(size) < 0.85 - 0.5 * ranks / PER_QUERY
            top = rng.integers(0, classes, size=(size, 5))
            top[:, 0] = np.where(clean & (rng.random(size) < 0.7), label, top[:, 0])
            probs = -np.sort(-rng.dirichlet(np.ones(6), size=size)[:, :5], axis=1)
            entries = []
            for i in range(size):
                image = f"{q:06d}{i:04d}"
                path = f"{source}/{query}/{image}.jpg"
                filelists[source].write(f"{path} {label}\n")
                truth.write(f"{path}\t{int(clean[i])}\n")
                entry = {"id": image, "rank": int(ranks[i]), "title": titles[i], "description": descriptions[i]}
                if source == "flickr":
                    entry["tags"] = tags[i]
                entries.append(entry)
                classes_i = list(dict.fromkeys(top[i].tolist()))  # a top-k list names each class once
                pred.write(path + "\t" + " ".join(f"{wnids[c]}:{p:.6f}" for c, p in zip(classes_i, probs[i])) + "\n")
            (root / source / f"{query}.json").write_text(json.dumps(entries))
    for f in (*filelists.values(), *query_lists.values(), truth):
        f.close()
    return knn, predictions


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (forked workers)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _step(step: str, root: str, out: str) -> dict:
    """One step, run in a fresh process (`python -c`): its times and its peak RSS."""
    from megaclass.data.metadata import load_metadata
    from megaclass.memory import peak_rss_bytes

    root_path = Path(root)
    start, cpu = time.perf_counter(), _cpu_seconds()
    data = load_metadata(root_path, check_images=False)
    result = {"read_s": time.perf_counter() - start, "read_cpu_s": _cpu_seconds() - cpu,
              "images": len(data.train), "column_bytes": data.train.nbytes,
              "read_peak_rss_bytes": peak_rss_bytes()}  # whether the step's peak is its reading's or its own
    start, cpu = time.perf_counter(), _cpu_seconds()
    if step == "keywords":
        from megaclass.weighting.keywords import KeywordExtractor
        from megaclass.weighting.pipeline import train_keyword_bags

        bags = train_keyword_bags(data, KeywordExtractor(), details=result)
        result.update(vocabulary=len(bags.words), mean_keywords=float(bags.lengths().mean()))
    elif step in ("stage1", "stage2"):
        from megaclass.weighting.pipeline import compute_weights, save_weights

        stage = int(step[-1])
        weights = compute_weights(root_path, root_path / "knn.tsv", root_path / "predictions.tsv", stage, data=data,
                                  stage1_tsv=Path(out) / "w1.tsv" if stage == 2 else None, drop_text=True)
        save_weights(weights, root_path, Path(out) / f"w{stage}.tsv", plot=False)
        result.update({k: v for k, v in weights.notes.items()})
    result["step_s"], result["step_cpu_s"] = time.perf_counter() - start, _cpu_seconds() - cpu
    # the machine's peak: this process's, plus what forked keyword workers held privately beside it
    result["peak_rss_bytes"] = peak_rss_bytes() + result.get("workers_private_bytes", 0)
    if step in ("stage1", "stage2"):  # after the step's time and peak: how well its weights rank the truth
        from megaclass.data.columns import lookup
        from megaclass.weighting.metrics import roc_auc
        from megaclass.weighting.tables import read_weight_column

        truth_paths, clean = read_weight_column(root_path / TRUTH)
        row = lookup(truth_paths, weights.paths)
        result["auc"] = round(roc_auc(weights.weights, clean[row] > 0), 4)
    return result


def _run_step(step: str, root: Path) -> dict:
    code = (f"import json; from megaclass.bench.data import _step; "
            f"print('RESULT', json.dumps(_step({step!r}, {str(root)!r}, {str(root)!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"step {step} failed:\n{done.stderr[-3000:]}")
    line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def measure(n: int, classes: int, seed: int, work: Path) -> dict:
    root = work / f"data_{n}"
    start = time.perf_counter()
    generate(root, n, classes, seed)
    row = {"images": n, "generate_s": round(time.perf_counter() - start, 1)}
    try:
        for step in STEPS:
            result = _run_step(step, root)
            key = "read" if step == "read" else "step"
            seconds, cpu = result[f"{key}_s"], result[f"{key}_cpu_s"]
            extra = {k: v for k, v in result.items() if not k.endswith("_s")}  # the times' keys end so
            row[step] = {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), **extra}
            print(f"N={n} {step}: {seconds:.1f} s ({cpu:.1f} s CPU), peak RSS {extra['peak_rss_bytes'] / 1e9:.2f} GB "
                  f"{json.dumps({k: v for k, v in extra.items() if k != 'peak_rss_bytes'})}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return row


def fit_line(n: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(fixed, per_image) ≥ 0 minimising Σ (fixed + per_image·n − y)²: the unconstrained least squares
    where both are non-negative, else the best fit with one of them 0 (the KKT solutions of 2 variables)."""
    n, y = np.asarray(n, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(set(n.tolist())) > 1:
        fixed, per_image = np.linalg.lstsq(np.stack([np.ones_like(n), n], 1), y, rcond=None)[0]
        if fixed >= 0 and per_image >= 0:
            return float(fixed), float(per_image)
    candidates = [(0.0, max(float(n @ y / (n @ n)), 0.0)), (max(float(y.mean()), 0.0), 0.0)]
    return min(candidates, key=lambda c: float(np.square(c[0] + c[1] * n - y).sum()))


def extrapolate(rows: list[dict], sizes: list[int]) -> tuple[list[dict], dict]:
    """Per step and quantity, `fit_line` to the measured rows, and its value at `sizes`; `fits` holds
    fixed, per_image and the log-log slope between the two largest measured sizes (None with one size,
    where the fit is a proportion through 0 and `assumed_proportional` says so)."""
    rows = sorted(rows, key=lambda r: r["images"])
    n = np.array([r["images"] for r in rows], dtype=np.float64)
    fits, out = {"assumed_proportional": len(set(n.tolist())) < 2}, [{"images": s, "extrapolated": True} for s in sizes]
    for step in STEPS:
        for key in ("seconds", "cpu_seconds", "peak_rss_bytes"):
            y = np.array([r[step][key] for r in rows], dtype=np.float64)
            fixed, per_image = fit_line(n, y)
            slope = (float(np.log(y[-1] / y[-2]) / np.log(n[-1] / n[-2]))
                     if len(n) > 1 and n[-1] > n[-2] and y[-1] > 0 and y[-2] > 0 else None)
            fits[f"{step}_{key}"] = {"fixed": fixed, "per_image": per_image,
                                     "loglog_slope_largest_two": None if slope is None else round(slope, 3)}
            for row, size in zip(out, sizes):
                row.setdefault(step, {})[key] = fixed + per_image * size
    return out, fits


def _total(row: dict) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds) of reading + stage 1 + stage 2, and the largest peak RSS of a step."""
    stages = ("read", "stage1", "stage2")
    return (sum(row[s]["seconds"] for s in stages), sum(row[s]["cpu_seconds"] for s in stages),
            max(row[s]["peak_rss_bytes"] for s in STEPS))


def plot(png: str, measured: list[dict], predicted: list[dict], fits: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megaclass.io import atomic_output

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    panels = ((axes[0], "seconds", 1.0, "s", "wall time of the step", TARGET_SECONDS),
              (axes[1], "cpu_seconds", 1.0, "s", "CPU time of the step", TARGET_SECONDS),
              (axes[2], "peak_rss_bytes", 1e9, "GB", "peak RSS of the step's process", TARGET_BYTES / 1e9))
    xs = [r["images"] for r in measured]
    every = sorted(xs + [r["images"] for r in predicted])
    line = np.geomspace(every[0], every[-1], 50)
    for ax, key, scale, unit, label, target in panels:
        for step, color in zip(STEPS, ("C0", "C1", "C2", "C3")):
            ax.plot(xs, [r[step][key] / scale for r in measured], "o-", color=color, label=step)
            if predicted:
                fit = fits[f"{step}_{key}"]
                ax.plot(line, (fit["fixed"] + fit["per_image"] * line) / scale, "--", color=color, linewidth=0.8)
                ax.plot([r["images"] for r in predicted], [r[step][key] / scale for r in predicted], "o",
                        color=color, markerfacecolor="none")
        ax.axhline(target, color="gray", linestyle=":", label=f"16M target ({target:g} {unit}" +
                   (", read + both stages)" if key != "peak_rss_bytes" else ")"))
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("training images N (hollow on dashed: extrapolated, fixed + per-image fit)")
        ax.set_ylabel(f"{label} ({unit})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_output(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run(args) -> int:
    sizes = sorted(set(args.images))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="megaclass-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    measured = []
    try:
        for n in sizes:  # the results so far are written after each size: a long run can be stopped
            measured.append(measure(n, args.classes, args.seed, work))
            result = _results(args, measured)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    """The results as Markdown tables (the figures of docs/scale.md): every step of every size, measured
    or extrapolated (marked), then each fit."""
    lines = ["| N | | step | wall s | CPU s | peak RSS GB | of it, reading GB | EM steps (mean move) | AUC |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for row in result["measured"] + result["extrapolated"]:
        kind = "**extrapolated**" if row["extrapolated"] else "measured"
        for step in STEPS:
            r = row[step]
            em = "; ".join(f"{r[steps]} ({r[move]:.1e}{'' if r[ok] else ', NOT converged'})"
                           for steps, move, ok in (("em_steps", "em_mean_change", "em_converged"),
                                                   ("text_em_steps", "text_em_mean_change", "text_em_converged"))
                           if steps in r)
            if r.get("em_images", row["images"]) < row["images"]:
                em += f" on a sample of {r['em_images']:,}"
            reading = f"{r['read_peak_rss_bytes'] / 1e9:.2f}" if "read_peak_rss_bytes" in r else ""
            lines.append(f"| {row['images']:,} | {kind} | {step} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                         f"{r['peak_rss_bytes'] / 1e9:.2f} | {reading} | {em} | {r.get('auc', '')} |")
        lines.append(f"| {row['images']:,} | {kind} | read + stage 1 + stage 2 | {row['read_plus_stages_s']:.0f} | "
                     f"{row['read_plus_stages_cpu_s']:.0f} | {row['max_peak_rss_bytes'] / 1e9:.2f} (max) | | | |")
    if result["fits"]:
        lines += ["", "| step | quantity | fixed | per image | per million | log-log slope, largest two |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for step in STEPS:
            for key, unit, scale in (("seconds", "s", 1.0), ("cpu_seconds", "s", 1.0), ("peak_rss_bytes", "GB", 1e9)):
                fit = result["fits"][f"{step}_{key}"]
                lines.append(f"| {step} | {key} | {fit['fixed'] / scale:.3g} {unit} | {fit['per_image'] / scale:.3g} {unit} "
                             f"| {fit['per_image'] * 1e6 / scale:.3g} {unit} | {fit['loglog_slope_largest_two']} |")
    return "\n".join(lines)


def _results(args, measured: list[dict]) -> dict:
    done = [r["images"] for r in measured]
    wanted = sorted(s for s in set(args.extrapolate) | set(args.images) if s not in done)
    predicted, fits = extrapolate(measured, wanted) if wanted else ([], {})
    result = {"classes": args.classes, "images_per_query": PER_QUERY, "cpu_count": os.cpu_count(),
              "measured": [{**r, "extrapolated": False} for r in measured], "extrapolated": predicted, "fits": fits,
              "em": {"tolerance": TOLERANCE, "max_iterations": MAX_ITERATIONS, "stage1_sample": EM_SAMPLE,
                     "stops_on": "mean |change| of the responsibilities over one SQUAREM cycle < tolerance"},
              "note": "each step in its own process; step times exclude the reading they repeat, peak RSS includes it; "
                      "extrapolated rows are fixed + per_image·N fitted per step (non-negative least squares) to the "
                      "measured sizes, not runs",
              "target": {"images": TARGET_IMAGES, "seconds": TARGET_SECONDS, "peak_rss_bytes": TARGET_BYTES}}
    for row in result["measured"] + predicted:
        seconds, cpu, rss = _total(row)
        row["read_plus_stages_s"], row["read_plus_stages_cpu_s"] = round(seconds, 1), round(cpu, 1)
        row["max_peak_rss_bytes"] = int(rss)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
        plot(os.path.splitext(args.json)[0] + ".png", measured, predicted, fits,
             f"megaclass bench data: {args.classes} classes, metadata only, {os.cpu_count()} cores")
    return result
