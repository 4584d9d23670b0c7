"""`megaclass bench ce`: forward + backward of the fused sample-weighted linear cross-entropy against its
peers and against the floor, the three GEMMs every implementation must do (logits = X Wᵀ, dX = G W,
dW = Gᵀ X) into preallocated outputs.

Each variant runs in its own process: the median of --repeats timed runs (after one warm-up); its
ratio to the floor ("× floor"), the median of --repeats (variant, floor) pairs timed alternately in
that process, so that load drifting between processes does not bias it; and the
peak memory it adds beyond its inputs ("peak MB", `megaclass.memory.MemoryProbe`; CPU: the RSS high-water mark, reset
once the inputs exist, minus the RSS then; CUDA: torch.cuda.max_memory_allocated minus the allocation once
the inputs exist), the process's whole peak RSS ("RSS MB": torch, inputs and all), and the minor page faults
per timed step ("faults", getrusage: steady under load, unlike the times). The loss is
`mean_i s_i · CE_i` with random s_i in [0, 1).

The workers run in the environment as given (THP_MEM_ALLOC_ENABLE unset unless the caller sets it), and
each step starts from hidden.grad = weight.grad = None, as `optimizer.zero_grad()` leaves them: the
`megaclass` row is plain autograd with a fresh weight.grad every step, the case a new user meets. (The op
carves such gradients on CPU from a storage it keeps once autograd released it, so they need not
page-fault in every step as a fresh 50 MB allocation would.) `megaclass-fold` shows the op writing dW
into a buffer allocated once (`weight_grad_into`), as megaclass's trainer folds it into the SGD
momentum buffer.

`--tp P` runs the op's variants on P gloo ranks (NCCL on CUDA), classes split unevenly as in
ShardedLinearCrossEntropy, each rank with threads/P threads, and also the op on one rank holding all
classes: the losses must agree. Time = slowest rank's median; memory = largest rank's peak.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import time

import torch

from megaclass.argtypes import output_file, positive_int
from megaclass.bench.ranks import RankFailed, launch, machine
from megaclass.io import atomic_write_text
from megaclass.memory import MemoryProbe

VARIANTS = {
    "megaclass": "megaclass.ops.linear_cross_entropy, kernels from megaclass._C, plain autograd (a fresh "
                 "weight.grad each step)",
    "megaclass-twin": "megaclass.ops.linear_cross_entropy, PyTorch twin kernels",
    "megaclass-fold": "megaclass.ops.linear_cross_entropy, dW written into a buffer allocated once "
                      "(weight_grad_into, as the trainer folds it into the SGD momentum)",
    "naive": "x @ W.T, F.cross_entropy(reduction='none') * s, mean",
    "torch": "torch.nn.functional.linear_cross_entropy(options=LinearCrossEntropyOptions())",
    "cce": "cut_cross_entropy.linear_cross_entropy (impl torch_compile on CPU, cce on CUDA)",
    "liger": "Liger-Kernel LigerFusedLinearCrossEntropyLoss (CUDA)",
    "floor": "three GEMMs into preallocated outputs",
}
TP_VARIANTS = ("megaclass", "megaclass-twin", "megaclass-fold")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser("ce", help="fused linear + weighted cross-entropy against its peers and the GEMM floor",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=positive_int, default=2048, help="rows N of hidden (default 2048)")
    parser.add_argument("--d", type=positive_int, default=256, help="features D (default 256)")
    parser.add_argument("--c", type=positive_int, default=50_000, help="classes C over all ranks (default 50000)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="input dtype (default fp32)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device (default cpu)")
    parser.add_argument("--tp", type=positive_int, default=1, help="ranks the classes are split over (default 1)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                        help=f"CPU threads in all (split over --tp ranks; default {torch.get_num_threads()})")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed runs per variant; the median is reported")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time (default); cpu: the process's CPU time, steadier on a shared "
                             "machine with --threads 1 (with more threads it also counts their spin-waits)")
    parser.add_argument("--chunk-size", type=positive_int, default=None, help="rows per chunk of the op (default: its own)")
    parser.add_argument("--init", choices=["host", "device"], default="host",
                        help="host (default): inputs drawn on the CPU, the weight as ShardedLinearCrossEntropy "
                             "initializes it (one weight for any --tp); device: drawn on --device by its own "
                             "generator, the same distributions (no CPU draw of a C × D weight in every "
                             "benchmark process; --tp 1 only)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of: " + ", ".join(VARIANTS) + " (default: all available)")
    parser.add_argument("--json", type=output_file, default=None, metavar="OUT", help="also write the results as JSON to OUT")
    parser.set_defaults(func=run)


def available(name: str, device: str) -> str | None:
    """None if the variant can run here, else why not."""
    if name in ("megaclass", "megaclass-fold"):
        import warnings
        from megaclass.ops import kernels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return None if kernels.extension() is not None else "megaclass._C is not built"
    if name == "torch":
        return None if hasattr(torch.nn.functional, "linear_cross_entropy") else "torch has no linear_cross_entropy"
    if name in ("cce", "liger"):
        module = {"cce": "cut_cross_entropy", "liger": "liger_kernel"}[name]
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed"
        if name == "liger" and device != "cuda":
            return "Liger-Kernel runs on CUDA only"
    return None


# ---------------------------------------------------------------------------------------------------
# one variant in one process (a rank of --tp)


def _inputs(spec, rank, world):
    """hidden [N, D], this rank's weight shard [C_r, D] (shards of one weight for any world), target, s."""
    from megaclass.nn import ShardedLinearCrossEntropy
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    if spec.get("init") == "device":  # the same distributions as below, drawn where they are used
        gen = torch.Generator(device).manual_seed(0)
        hidden = torch.randn(spec["n"], spec["d"], generator=gen, device=device, dtype=dtype).requires_grad_()
        target = torch.randint(0, spec["c"], (spec["n"],), generator=gen, device=device)
        s = torch.rand(spec["n"], generator=gen, device=device)
        bound = 4.0 / spec["d"] ** 0.5  # nn.Linear's U(±1/√D), times 4 as below
        weight = torch.empty(spec["c"], spec["d"], device=device, dtype=dtype).uniform_(-bound, bound, generator=gen)
        return hidden, weight.requires_grad_(), target, s, 0
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(spec["n"], spec["d"], generator=gen).to(device=device, dtype=dtype).requires_grad_()
    target = torch.randint(0, spec["c"], (spec["n"],), generator=gen).to(device)
    s = torch.rand(spec["n"], generator=gen).to(device)
    torch.manual_seed(1)
    head = ShardedLinearCrossEntropy(spec["d"], spec["c"], bias=False, device=device, dtype=dtype)
    weight = head.weight.detach().mul_(4.0).requires_grad_()  # logits of order 1: a realistic softmax
    return hidden, weight, target, s, head.class_start


def _step_fn(name, spec, hidden, weight, target, s, class_start):
    """A function running one forward + backward of the variant; returns the loss."""
    import torch.nn.functional as F
    if name in TP_VARIANTS:
        from megaclass.ops import linear_cross_entropy
        from megaclass.parallel import comm
        group = comm.default_group()
        implementation = "torch" if name == "megaclass-twin" else "extension"
        # beta 0: the buffer is overwritten each step, as the floor overwrites its preallocated dW
        fold = (torch.empty_like(weight, requires_grad=False), 0.0) if name == "megaclass-fold" else None

        def step():
            loss = linear_cross_entropy(hidden, weight, target, s, class_start=class_start, process_group=group,
                                        chunk_size=spec["chunk_size"], implementation=implementation,
                                        weight_grad_into=fold)
            loss.backward()
            return loss
        return step
    if name == "floor":
        n, c = hidden.shape[0], weight.shape[0]
        logits = torch.empty(n, c, dtype=hidden.dtype, device=hidden.device)
        dx, dw = torch.empty_like(hidden), torch.empty_like(weight)
        x, w = hidden.detach(), weight.detach()

        def step():
            torch.mm(x, w.t(), out=logits)
            torch.mm(logits, w, out=dx)
            torch.mm(logits.t(), x, out=dw)
            return torch.zeros(())
        return step
    if name == "naive":
        def rows(x, w, t):
            return F.cross_entropy(x @ w.t(), t, reduction="none")
    elif name == "torch":
        from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions
        options = LinearCrossEntropyOptions()

        def rows(x, w, t):
            return F.linear_cross_entropy(x, w, t, reduction="none", options=options)
    elif name == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce
        impl = "cce" if hidden.device.type == "cuda" else "torch_compile"

        def rows(x, w, t):
            return cce(x, w, t, reduction="none", impl=impl)
    elif name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="none")

        def rows(x, w, t):
            return loss_fn(w, x, t)
    else:
        raise ValueError(f"unknown variant {name!r}")

    def step():
        loss = (rows(hidden, weight, target).float() * s).mean()
        loss.backward()
        return loss
    return step


def worker(spec) -> dict:
    """One rank of one variant (run by `megaclass.bench.ranks.launch`)."""
    from megaclass.parallel import comm
    rank, world = spec.get("rank", 0), spec.get("world", 1)
    torch.set_num_threads(max(1, spec["threads"] // world))
    if spec["device"] == "cuda":
        torch.cuda.set_device(rank)  # before NCCL starts: each rank's communicator on its own GPU
    if world > 1:
        comm.init_group("nccl" if spec["device"] == "cuda" else "gloo", rank, world, port=spec["port"])
    cuda = spec["device"] == "cuda"
    hidden, weight, target, s, class_start = _inputs(spec, rank, world)
    memory = MemoryProbe(spec["device"])
    step = _step_fn(spec["variant"], spec, hidden, weight, target, s, class_start)
    clock = time.process_time if spec["clock"] == "cpu" else time.perf_counter
    times, faults = [], 0
    for i in range(spec["repeats"] + 1):
        hidden.grad = weight.grad = None
        comm.barrier(comm.default_group())
        if cuda:
            torch.cuda.synchronize()
        start, minflt = clock(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first run warms up (allocator, compilation, thread pools)
            times.append(clock() - start)
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - minflt
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the whole process, inputs included
    result = {"median_s": statistics.median(times), "min_s": min(times), "peak_bytes": memory.added(),
              "peak_rss_bytes": rss, "loss": float(loss.detach().float()),
              "faults_per_step": faults / spec["repeats"]}
    if world == 1 and spec["variant"] != "floor":
        # the ratio to the floor, timed alternately in this process (after the memory was read): steady
        # even when the machine's load drifts between the variants' processes
        floor = _step_fn("floor", spec, hidden, weight, target, s, class_start)
        floor()
        ratios = []
        for _ in range(spec["repeats"]):
            pair = []
            for fn in (step, floor):
                hidden.grad = weight.grad = None
                if cuda:
                    torch.cuda.synchronize()
                start = clock()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                pair.append(clock() - start)
            ratios.append(pair[0] / pair[1])
        result["floor_ratio"] = statistics.median(ratios)
    comm.destroy_group()
    return result


# ---------------------------------------------------------------------------------------------------
# the parent: one process (or P ranks) per variant, then the table


def _launch(spec, world) -> dict:
    """Run the variant in `world` fresh processes; slowest median, largest peak, rank 0's loss."""
    # the workers inherit the environment (THP_MEM_ALLOC_ENABLE included): see the module docstring
    try:
        results = launch("megaclass.bench.ce:worker", spec, world, {"OMP_NUM_THREADS": str(max(1, spec["threads"] // world))})
    except RankFailed as exc:
        return {"error": str(exc)}
    merged = {key: max(r[key] for r in results)
              for key in ("median_s", "min_s", "peak_bytes", "peak_rss_bytes", "faults_per_step")}
    return merged | {key: results[0][key] for key in ("loss", "floor_ratio") if key in results[0]}


def run(args) -> int:
    if args.tp < 1 or args.n < 1 or args.d < 1 or args.c < args.tp or args.repeats < 1:
        raise SystemExit("megaclass bench ce: --n, --d, --repeats and --tp must be ≥ 1 and --c ≥ --tp")
    if args.init == "device" and args.tp > 1:
        raise SystemExit("megaclass bench ce: --init device draws one weight per process: use it with --tp 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("megaclass bench ce: --device cuda but no CUDA GPU is visible")
    names = list(VARIANTS) if args.variants is None else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"megaclass bench ce: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    spec = {"n": args.n, "d": args.d, "c": args.c, "dtype": args.dtype, "device": args.device,
            "threads": args.threads, "repeats": args.repeats, "chunk_size": args.chunk_size, "clock": args.clock,
            "init": args.init,
            "thp": os.environ.get("THP_MEM_ALLOC_ENABLE")}  # reported only: the workers inherit the environment
    runs = []  # (label, variant, world)
    for name in names:
        if args.tp > 1 and name not in TP_VARIANTS:
            continue
        runs.append((name if args.tp == 1 else f"{name} ({args.tp} ranks)", name, args.tp))
    if args.tp > 1 and available("megaclass", args.device) is None:
        runs.append(("megaclass (1 rank)", "megaclass", 1))
    machine_info = machine(args.device)  # before the benchmark's own load
    results = []
    for label, name, world in runs:
        why = available(name, args.device)
        row = {"variant": label, "description": VARIANTS[name]}
        if why is not None:
            row["skipped"] = why
        else:
            log.info("running %s ...", label)
            row.update(_launch(dict(spec, variant=name), world))
        results.append(row)
    report = {"config": dict(spec, tp=args.tp), "machine": machine_info, "results": results}
    print(format_table(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
    return 0


def format_table(report) -> str:
    cfg = report["config"]
    by_name = {r["variant"]: r for r in report["results"]}
    floor = by_name.get("floor", {}).get("median_s")
    naive = by_name.get("naive", {}).get("peak_bytes")
    lines = [f"N={cfg['n']} D={cfg['d']} C={cfg['c']} {cfg['dtype']} {cfg['device']} tp={cfg['tp']} "
             f"threads={cfg['threads']} clock={cfg['clock']} THP={cfg.get('thp') or 'unset'}  ({report['machine']['cpu']}; "
             f"torch {report['machine']['torch']})",
             f"{'variant':<28} {'median ms':>10} {'× floor':>8} {'peak MB':>9} {'× naive':>8} {'RSS MB':>8} "
             f"{'loss':>12} {'faults':>7}"]
    for r in report["results"]:
        if "median_s" not in r:
            lines.append(f"{r['variant']:<28} {'skipped: ' + r.get('skipped', r.get('error', '?'))}")
            continue
        ratio = (f"{r['floor_ratio']:.3f}" if "floor_ratio" in r else
                 f"{r['median_s'] / floor:.3f}" if floor else "-")
        mem = f"{r['peak_bytes'] / naive:.3f}" if naive else "-"
        loss = "-" if r["variant"] == "floor" else f"{r['loss']:.6f}"
        lines.append(f"{r['variant']:<28} {r['median_s'] * 1e3:>10.1f} {ratio:>8} {r['peak_bytes'] / 2**20:>9.1f} "
                     f"{mem:>8} {r['peak_rss_bytes'] / 2**20:>8.0f} {loss:>12} {r.get('faults_per_step', 0):>7.0f}")
    return "\n".join(lines)

