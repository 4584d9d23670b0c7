"""The GPU check's report: DIR/bench/*.json (one `megaclass bench ce` report per variant and shape) ->
DIR/results.json and DIR/results.md, with the GPU's bf16 GEMM throughput and the two CUDA kernels'
memory bandwidth measured here, and the targets of the CUDA issue checked at 8,192 × 256,000 × 2,304:
  memory beyond inputs, parameters and their gradients ≤ 1.2 GB (10⁹ bytes);
  time ≤ cut-cross-entropy's (impl="cce") in the same run;
  the three GEMMs' FLOPs (3 · 2·N·C·D) per second ≥ 60 % of the GPU's bf16 GEMM throughput.
Usage: python .ci/gpu_report.py DIR [--tests-log FILE --tests-status CODE]
"""
from __future__ import annotations

import argparse
import glob
import json
import os

import torch

ORDER = ["megaclass", "cce", "liger", "torch", "naive", "floor", "megaclass-twin"]
NAMES = {"megaclass": "megaclass (CUDA kernels)", "cce": "cut-cross-entropy (cce)", "liger": "Liger-Kernel",
         "torch": "torch linear_cross_entropy", "naive": "naive (logits + F.cross_entropy)",
         "floor": "three GEMMs (floor)", "megaclass-twin": "megaclass (PyTorch twin)"}
TARGET_SHAPE = (8192, 256_000, 2304)
MEMORY_TARGET = 1.2e9


def gemm_tflops(size: int = 8192, repeats: int = 20) -> float:
    """Best bf16 `torch.mm` throughput at size³: the GPU's practical GEMM peak."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(a)
    return 2 * size ** 3 / _best_seconds(lambda: torch.mm(a, b, out=out), repeats) / 1e12


def _best_seconds(fn, repeats: int = 10) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def kernel_bandwidth(rows: int = 1024, cols: int = 256_000) -> dict:
    """GB/s of the two CUDA kernels on a bf16 chunk [rows, cols], against a plain device copy (read +
    write): how close the memory-bound passes come to the GPU's bandwidth."""
    from megaclass import _C  # noqa: F401  (registers torch.ops.megaclass)

    ops = torch.ops.megaclass
    logits = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    work = torch.empty_like(logits)
    target = torch.randint(0, cols, (rows,), device="cuda")
    shift = torch.full((rows,), 20.0, device="cuda")
    coef = torch.full((rows,), 1e-3, device="cuda")
    size = logits.numel() * logits.element_size()
    copy = _best_seconds(lambda: work.copy_(logits))
    stats = _best_seconds(lambda: ops.lce_chunk_stats(logits, target, 0, False))
    grad = _best_seconds(lambda: ops.lce_chunk_grad_(work, target, 0, shift, coef, 0.9, 1e-7, False))
    return {"shape": [rows, cols], "copy_GBps": 2 * size / copy / 1e9, "stats_GBps": size / stats / 1e9,
            "grad_GBps": 2 * size / grad / 1e9}


def load(directory: str) -> dict:
    """{(n, c, d): {variant: row}} from the per-variant reports."""
    shapes: dict = {}
    for path in sorted(glob.glob(os.path.join(directory, "bench", "*.json"))):
        with open(path) as f:
            report = json.load(f)
        cfg = report["config"]
        for row in report["results"]:
            shapes.setdefault((cfg["n"], cfg["c"], cfg["d"]), {})[row["variant"]] = row
    return shapes


def enrich(shape, rows, peak_tflops) -> list[dict]:
    """Rows in ORDER with derived columns; variants that never reported get a row saying so."""
    n, c, d = shape
    flops = 3 * 2 * n * c * d
    grads = (n * d + c * d) * 2  # bf16 d(hidden) and d(weight)
    floor = rows.get("floor", {}).get("median_s")
    cce = rows.get("cce", {}).get("median_s")
    out = []
    for name in ORDER:
        row = dict(rows.get(name, {"variant": name, "error": "no result (failed, out of time or left out)"}))
        if name == "megaclass-twin" and name not in rows:
            continue
        if "median_s" in row:
            t = row["median_s"]
            row.update(vs_floor=t / floor if floor else None, vs_cce=t / cce if cce else None,
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
    if "median_s" in cce:
        result.append(("time ≤ cut-cross-entropy's", ours["median_s"] <= cce["median_s"],
                       f"{ours['median_s'] * 1e3:.1f} ms vs {cce['median_s'] * 1e3:.1f} ms"))
    else:
        result.append(("time ≤ cut-cross-entropy's", None, "cut-cross-entropy did not run"))
    result.append(("≥ 60 % of the bf16 GEMM throughput", ours["gemm_fraction"] >= 0.6,
                   f"{100 * ours['gemm_fraction']:.0f} %"))
    return result


def _fmt(value, spec, missing="–"):
    return missing if value is None else format(value, spec)


def markdown(report) -> str:
    lines = [f"### `megaclass bench ce` on {report['gpu']} (bf16, forward + backward)", "",
             f"torch {report['torch']}, CUDA {report['cuda']}; bf16 GEMM throughput measured here: "
             f"{report['gemm_tflops']:.0f} TFLOP/s (8192³ `torch.mm`). CUDA tests: {report['tests']['summary']}", ""]
    bw = report["kernels"]
    if "error" in bw:
        lines += [f"Kernel bandwidth: not measured ({bw['error']})", ""]
    else:
        lines += [f"Kernels on a bf16 chunk {bw['shape'][0]:,} × {bw['shape'][1]:,}: statistics {bw['stats_GBps']:.0f} GB/s "
                  f"(one read), gradient {bw['grad_GBps']:.0f} GB/s (read + write); a device copy reaches "
                  f"{bw['copy_GBps']:.0f} GB/s.", ""]
    for shape in report["shapes"]:
        n, c, d = shape["n"], shape["c"], shape["d"]
        lines += [f"**N = {n:,}, C = {c:,}, D = {d:,}** (median of the timed runs; memory: peak allocated beyond "
                  "the inputs, and beyond the inputs, parameters and their gradients)", "",
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
                f"| {name} | {row['median_s'] * 1e3:.1f} | {_fmt(row['vs_floor'], '.2f')} | {_fmt(row['vs_cce'], '.2f')} "
                f"| {row['tflops']:.0f} | {100 * row['gemm_fraction']:.0f} | {row['peak_bytes'] / 1e9:.2f} "
                f"| {row['beyond_grads_bytes'] / 1e9:.2f} | {loss} |")
        lines.append("")
        if shape.get("targets"):
            lines.append("Targets:")
            for what, ok, value in shape["targets"]:
                verdict = "n/a" if ok is None else "met" if ok else "NOT met"
                lines.append(f"- {what}: {value} — {verdict}")
            lines.append("")
    lines.append("Produced by `make gpu-check` (`.ci/gpu-check`).")
    return "\n".join(lines) + "\n"


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="the GPU check's results folder (holding bench/*.json)")
    parser.add_argument("--tests-log", default=None, help="pytest's output, whose last line is the summary")
    parser.add_argument("--tests-status", type=int, default=None, help="pytest's exit status")
    args = parser.parse_args()
    summary = "not run"
    if args.tests_log and os.path.exists(args.tests_log):
        with open(args.tests_log) as f:
            tail = [line.strip() for line in f if line.strip()]
        summary = tail[-1].strip("= ") if tail else "no output"
    peak = gemm_tflops()
    try:
        kernels = kernel_bandwidth()
    except Exception as exc:  # a missing or broken extension still leaves the benchmark's report
        kernels = {"error": f"{type(exc).__name__}: {exc}"}
    shapes = []
    for shape, rows in sorted(load(args.dir).items(), key=lambda item: item[0][1]):
        enriched = enrich(shape, rows, peak)
        shapes.append({"n": shape[0], "c": shape[1], "d": shape[2], "rows": enriched,
                       "targets": targets(enriched) if shape == TARGET_SHAPE else []})
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "gemm_tflops": peak, "kernels": kernels, "tests": {"status": args.tests_status, "summary": summary}, "shapes": shapes}
    _write(os.path.join(args.dir, "results.json"), json.dumps(report, indent=2) + "\n")
    _write(os.path.join(args.dir, "results.md"), markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
