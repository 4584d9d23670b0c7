"""The GPU check's report: LOGS/bench/*.json (one `megaclass bench ce` report per variant and shape),
LOGS/tests.xml (the CUDA tests' junit XML), LOGS/peers.log, LOGS/input.json (`megaclass bench input`) and the
stage times -> OUT/results.json and
OUT/results.md, with the device's GEMM throughput and the two CUDA kernels' memory bandwidth measured here,
and the targets of the CUDA issue checked at the target shape (8,192 × 256,000 × 2,304 on the GPU):
  memory beyond inputs, parameters and their gradients ≤ 1.2 GB (10⁹ bytes);
  time ≤ 1.15 × the three GEMMs into preallocated outputs (the floor), and ≤ cut-cross-entropy's (impl="cce");
  the three GEMMs' FLOPs (3 · 2·N·C·D) per second ≥ 60 % of the device's GEMM throughput.
With --rehearsal (CPU, tiny shapes) the same figures are computed, and the verdicts mean nothing.
Usage: python .ci/gpu_report.py LOGS --out OUT --stages STAGES.tsv --target-shape N,C,D [--device cuda|cpu]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import time
import xml.etree.ElementTree as ET

import torch

ORDER = ["megaclass", "cce", "liger", "torch", "naive", "floor", "megaclass-twin"]
NAMES = {"megaclass": "megaclass (CUDA kernels)", "cce": "cut-cross-entropy (cce)", "liger": "Liger-Kernel",
         "torch": "torch linear_cross_entropy", "naive": "naive (logits + F.cross_entropy)",
         "floor": "three GEMMs (floor)", "megaclass-twin": "megaclass (PyTorch twin)"}
MEMORY_TARGET = 1.2e9
FLOOR_TARGET = 1.15
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _best_seconds(fn, device: str, repeats: int = 10) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
    return best


def gemm_tflops(device: str, dtype: torch.dtype, size: int) -> float:
    """Best `torch.mm` throughput at size³: the device's practical GEMM peak in that dtype."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty_like(a)
    return 2 * size ** 3 / _best_seconds(lambda: torch.mm(a, b, out=out), device) / 1e12


def kernel_bandwidth(device: str, dtype: torch.dtype, rows: int, cols: int) -> dict:
    """GB/s of the two kernels on a chunk [rows, cols], against a plain copy (read + write): how close the
    memory-bound passes come to the device's bandwidth."""
    from megaclass import _C  # noqa: F401  (registers torch.ops.megaclass)

    ops = torch.ops.megaclass
    logits = torch.randn(rows, cols, device=device, dtype=dtype)
    work = torch.empty_like(logits)
    target = torch.randint(0, cols, (rows,), device=device)
    shift = torch.full((rows,), 20.0, device=device)
    coef = torch.full((rows,), 1e-3, device=device)
    size = logits.numel() * logits.element_size()
    copy = _best_seconds(lambda: work.copy_(logits), device)
    stats = _best_seconds(lambda: ops.lce_chunk_stats(logits, target, 0, False), device)
    grad = _best_seconds(lambda: ops.lce_chunk_grad_(work, target, 0, shift, coef, 0.9, 1e-7, False), device)
    return {"shape": [rows, cols], "copy_GBps": 2 * size / copy / 1e9, "stats_GBps": size / stats / 1e9,
            "grad_GBps": 2 * size / grad / 1e9}


def load(directory: str) -> dict:
    """{(n, c, d, dtype): {variant: row}} from the per-variant reports."""
    shapes: dict = {}
    for path in sorted(glob.glob(os.path.join(directory, "bench", "*.json"))):
        with open(path) as f:
            report = json.load(f)
        cfg = report["config"]
        for row in report["results"]:
            shapes.setdefault((cfg["n"], cfg["c"], cfg["d"], cfg["dtype"]), {})[row["variant"]] = row
    return shapes


def enrich(shape, rows, peak_tflops) -> list[dict]:
    """Rows in ORDER with derived columns; variants that never reported get a row saying so."""
    n, c, d, dtype = shape
    flops = 3 * 2 * n * c * d
    grads = (n * d + c * d) * DTYPES[dtype].itemsize  # d(hidden) and d(weight)
    floor = rows.get("floor", {}).get("median_s")
    cce = rows.get("cce", {}).get("median_s")
    out = []
    for name in ORDER:
        if name == "megaclass-twin" and name not in rows:
            continue
        row = dict(rows.get(name, {"variant": name, "error": "no result (failed, out of time or left out)"}))
        if "median_s" in row:
            t = row["median_s"]
            row.update(vs_floor=row.get("floor_ratio", t / floor if floor else None), vs_cce=t / cce if cce else None,
                       tflops=flops / t / 1e12, gemm_fraction=flops / t / 1e12 / peak_tflops,
                       beyond_grads_bytes=row["peak_bytes"] - grads)
        out.append(row)
    return out


def targets(rows: list[dict]) -> list[tuple[str, bool | None, str]]:
    by = {r["variant"]: r for r in rows}
    ours, cce = by.get("megaclass", {}), by.get("cce", {})
    if "median_s" not in ours:
        return [("megaclass ran", False, ours.get("error", ours.get("skipped", "no result")))]
    memory = ours["beyond_grads_bytes"]
    result = [(f"memory beyond inputs, parameters, gradients ≤ {MEMORY_TARGET / 1e9:.1f} GB",
               memory <= MEMORY_TARGET, f"{memory / 1e9:.2f} GB")]
    if ours.get("vs_floor") is not None:
        result.append((f"time ≤ {FLOOR_TARGET} × the three-GEMM floor", ours["vs_floor"] <= FLOOR_TARGET,
                       f"{ours['vs_floor']:.3f} ×"))
    if "median_s" in cce:
        result.append(("time ≤ cut-cross-entropy's", ours["median_s"] <= cce["median_s"],
                       f"{ours['median_s'] * 1e3:.1f} ms vs {cce['median_s'] * 1e3:.1f} ms"))
    else:
        result.append(("time ≤ cut-cross-entropy's", None, "cut-cross-entropy did not run"))
    result.append(("≥ 60 % of the GEMM throughput", ours["gemm_fraction"] >= 0.6,
                   f"{100 * ours['gemm_fraction']:.0f} %"))
    return result


def test_outcomes(path: str) -> dict:
    """Counts and the failed tests' names from pytest's junit XML."""
    if not os.path.exists(path):
        return {"summary": "not run", "failed": [], "skipped": {}}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"summary": f"unreadable junit XML ({exc})", "failed": [], "skipped": {}}
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failed, skipped = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}.{case.get('name', '')}".lstrip(".")
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        kind = {"failure": "failed", "error": "error", "skipped": "skipped"}[kinds[0]] if kinds else "passed"
        counts[kind] += 1
        if kind in ("failed", "error"):
            failed.append(name)
        elif kind == "skipped":
            reason = case.find("skipped").get("message", "")
            skipped[reason] = skipped.get(reason, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no tests"
    return {"summary": summary, **counts, "failed": failed, "skipped": skipped}


def read_stages(path: str) -> list[dict]:
    stages = []
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                name, seconds, outcome = line.rstrip("\n").split("\t")
                stages.append({"stage": name, "seconds": int(seconds), "outcome": outcome})
    return stages


def _fmt(value, spec, missing="–"):
    return missing if value is None else format(value, spec)


def markdown(report) -> str:
    mode = " — CPU rehearsal at tiny shapes (figures mean nothing)" if report["rehearsal"] else ""
    env = report["environment"]
    lines = [f"### `.ci/gpu-check` on {env['device_name']}{mode}", "",
             f"Python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}; "
             f"{report['dtype']} GEMM throughput measured here: {report['gemm_tflops']:.1f} TFLOP/s "
             f"({report['gemm_size']}³ `torch.mm`).", "",
             f"CUDA tests: {report['tests']['summary']}."]
    if report["tests"]["failed"]:
        lines.append("Failed: " + ", ".join(f"`{name}`" for name in report["tests"]["failed"]))
    lines += ["", "Peers: " + "; ".join(report["peers"]) if report["peers"] else "Peers: not checked", ""]
    total = sum(s["seconds"] for s in report["stages"])
    lines += [f"Stages ({total} s in all, budget {report['budget_s']} s):", "",
              "| stage | s | outcome |", "| --- | ---: | --- |"]
    lines += [f"| {s['stage']} | {s['seconds']} | {s['outcome']} |" for s in report["stages"]]
    lines.append("")
    bw = report["kernels"]
    if "error" in bw:
        lines += [f"Kernel bandwidth: not measured ({bw['error']})", ""]
    else:
        lines += [f"Kernels on a {report['dtype']} chunk {bw['shape'][0]:,} × {bw['shape'][1]:,}: statistics "
                  f"{bw['stats_GBps']:.1f} GB/s (one read), gradient {bw['grad_GBps']:.1f} GB/s (read + write); a copy "
                  f"reaches {bw['copy_GBps']:.1f} GB/s.", ""]
    for shape in report["shapes"]:
        n, c, d = shape["n"], shape["c"], shape["d"]
        lines += [f"**N = {n:,}, C = {c:,}, D = {d:,}, {shape['dtype']}** (`megaclass bench ce --init device`: median "
                  "of the timed runs; × floor timed alternately in one process; memory: peak allocated beyond the "
                  "inputs, and beyond the inputs, parameters and their gradients)", "",
                  "| variant | ms | × floor | × cce | 3-GEMM TFLOP/s | % of GEMM peak | peak GB | beyond grads GB | loss |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in shape["rows"]:
            name = NAMES.get(row["variant"], row["variant"])
            if "median_s" not in row:
                why = row.get("skipped", row.get("error", "?")).replace("|", "/")
                lines.append(f"| {name} | {why} |  |  |  |  |  |  |  |")
                continue
            loss = "–" if row["variant"] == "floor" else f"{row['loss']:.5f}"
            lines.append(
                f"| {name} | {row['median_s'] * 1e3:.1f} | {_fmt(row['vs_floor'], '.3f')} | {_fmt(row['vs_cce'], '.2f')} "
                f"| {row['tflops']:.1f} | {100 * row['gemm_fraction']:.0f} | {row['peak_bytes'] / 1e9:.2f} "
                f"| {row['beyond_grads_bytes'] / 1e9:.2f} | {loss} |")
        lines.append("")
        if shape.get("targets"):
            lines.append("Targets:")
            for what, ok, value in shape["targets"]:
                verdict = "n/a" if ok is None else "met" if ok else "NOT met"
                lines.append(f"- {what}: {value} — {verdict}")
            lines.append("")
    lines += input_markdown(report["input"])
    lines.append("Produced by `.ci/gpu-check OUT_DIR`; every stage's log is in OUT_DIR/logs.tar.gz.")
    return "\n".join(lines) + "\n"


def read_input(path: str) -> dict | None:
    """`megaclass bench input`'s JSON report, or None when that stage did not write one."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def input_markdown(bench: dict | None) -> list[str]:
    """The input pipeline beside the model step: the images/s that the host's cores and the GPU decoder supply."""
    if bench is None:
        return ["Input pipeline (`megaclass bench input`): no result (failed, out of time or left out).", ""]
    m = bench["model"]
    lines = [f"**Input pipeline** (`megaclass bench input`: {bench['config']['images']} photo-like 256-px JPEGs, "
             f"the training transform at {bench['config']['image_size']} px; CPU rows on one core of "
             f"{bench['machine']['cpu']})", "", "| source | decoder | images/s per core (CPU time) | images/s (wall) |",
             "| --- | --- | ---: | ---: |"]
    lines += [f"| {r['source']} | {r['decoder']} | {r['images_per_cpu_s']:.0f} | {r['images_per_s']:.0f} |"
              for r in bench["input"]]
    overhead = bench["shard_overhead_vs_memory"]
    lines += ["", (f"Shard reader overhead vs memory: {100 * overhead:+.1f} %. " if overhead is not None else "")
              + f"{m['model']} training step on {m['device']} ({m['dtype']}, batch {m['batch']}): {m['images_per_s']:.3g} "
              f"images/s, i.e. {bench['decode_cores_per_rank']:.2g} CPU cores decoding from {bench['decode_cores_from']} "
              "per rank."]
    if "gpu_decode" in bench:
        g = bench["gpu_decode"]
        lines.append(f"`decode_jpeg(device=\"cuda\")` in batches of {g['batch']}: {g['decode_images_per_s']:.0f} "
                     f"images/s, {g['decode_transform_images_per_s']:.0f} with the transform on the GPU; pixels equal "
                     f"to PIL's for {g['images_equal_to_pil']} of {bench['config']['images']} images (max difference "
                     f"{g['max_abs_diff_vs_pil']}).")
    return lines + [""]


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def environment(device: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "device": device, "device_name": name}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", help="the GPU check's log folder (bench/*.json, tests.xml, peers.log)")
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--stages", default=None, help="TSV of stage, seconds, outcome")
    parser.add_argument("--target-shape", required=True, help="N,C,D whose rows are checked against the targets")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="of the GEMM peak and the kernels")
    parser.add_argument("--budget-s", type=int, default=440, help="the stages' time budget (for the table)")
    parser.add_argument("--rehearsal", action="store_true", help="a CPU rehearsal: small measurements")
    args = parser.parse_args()
    target = tuple(int(v) for v in args.target_shape.split(","))
    gemm_size = 8192 if args.device == "cuda" else 256
    dtype = DTYPES[args.dtype]
    peak = gemm_tflops(args.device, dtype, gemm_size)
    try:
        kernels = kernel_bandwidth(args.device, dtype, *((1024, 256_000) if args.device == "cuda" else (64, 10_000)))
    except Exception as exc:  # a missing or broken extension still leaves the benchmark's report
        kernels = {"error": f"{type(exc).__name__}: {exc}"}
    shapes = []
    for shape, rows in sorted(load(args.logs).items(), key=lambda item: item[0][1]):
        enriched = enrich(shape, rows, peak)
        shapes.append({"n": shape[0], "c": shape[1], "d": shape[2], "dtype": shape[3], "rows": enriched,
                       "targets": targets(enriched) if shape[:3] == target else []})
    peers_log = os.path.join(args.logs, "peers.log")
    peers = open(peers_log).read().strip().splitlines() if os.path.exists(peers_log) else []
    report = {"rehearsal": args.rehearsal, "environment": environment(args.device), "dtype": args.dtype,
              "gemm_tflops": peak,
              "gemm_size": gemm_size, "kernels": kernels, "tests": test_outcomes(os.path.join(args.logs, "tests.xml")),
              "peers": peers, "input": read_input(os.path.join(args.logs, "input.json")), "budget_s": args.budget_s, "stages": read_stages(args.stages), "shapes": shapes}
    os.makedirs(args.out, exist_ok=True)
    _write(os.path.join(args.out, "results.json"), json.dumps(report, indent=2) + "\n")
    _write(os.path.join(args.out, "results.md"), markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
