"""The benchmarks' one rank launcher (and the machine's name for their reports): a worker function run on P fresh processes, one per rank.

A fresh process per run keeps one variant's allocations, thread pools and imports out of another's
peak memory. Each rank's stderr goes to a file, not a pipe: a pipe read rank after rank fills up
and blocks a rank that a peer then waits for in a collective.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile

from megaclass.io import atomic_write_text


class RankFailed(RuntimeError):
    """A rank exited non-zero; the message names it and the last line of its stderr."""


def launch(worker: str, spec: dict, world: int, env: dict | None = None) -> list[dict]:
    """Run `worker` ("module:function", taking a dict, returning a JSON-able dict) on `world` fresh
    Python processes, rank r with `spec | {rank, world, port}` and `env` added to the environment;
    returns their results in rank order."""
    from megaclass.parallel.comm import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world):
            out, err = os.path.join(tmp, f"rank{rank}.json"), open(os.path.join(tmp, f"rank{rank}.err"), "w+")
            command = [sys.executable, "-m", "megaclass.bench.ranks", worker,
                       json.dumps(dict(spec, rank=rank, world=world, port=port)), out]
            procs.append((rank, out, err, subprocess.Popen(command, env={**os.environ, **(env or {})}, stderr=err)))
        results, errors = [], []
        for rank, out, err, proc in procs:
            proc.wait()
            err.seek(0)
            lines = err.read().strip().splitlines()
            err.close()
            if proc.returncode:
                errors.append(f"rank {rank}: {lines[-1] if lines else f'exit code {proc.returncode}'}")
            else:
                with open(out) as f:
                    results.append(json.load(f))
    if errors:
        raise RankFailed("; ".join(errors))
    return results


def machine(device="cpu") -> dict:
    """The machine a benchmark ran on, for its report."""
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "load_average_1min_at_start": round(os.getloadavg()[0], 2)}  # quiet or shared: what the figures mean
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


if __name__ == "__main__":  # one rank: python -m megaclass.bench.ranks MODULE:FUNCTION SPEC_JSON OUT_JSON
    module, function = sys.argv[1].split(":")
    atomic_write_text(sys.argv[3], json.dumps(getattr(importlib.import_module(module), function)(json.loads(sys.argv[2]))))
