"""What the benchmarks share: one fresh process per variant (and rank), the memory probe, the machine's name.

A benchmark module runs as its own worker, `python -m MODULE SPEC_JSON OUT_JSON`, through `launch`; its
`if __name__ == "__main__": worker_main(fn)` turns the spec into the result file.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile

import torch

from megaclass.io import atomic_write_text
from megaclass.parallel.comm import free_port


def rss_bytes() -> int:
    """The process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


class MemoryProbe:
    """The peak memory added since `reset()`: CUDA, torch's max allocated; CPU, the resident set's high-water
    mark (reset through /proc/self/clear_refs, so that earlier peaks, e.g. a compiler's, do not count)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.reset()

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        self.base = rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the high-water mark := the resident set now
        except OSError:
            pass  # then the peak is the process's, an upper bound

    def added(self) -> int:
        peak = torch.cuda.max_memory_allocated() if self.cuda else _peak_rss_bytes()
        return max(0, peak - self.base)


def launch(module: str, spec: dict, world: int = 1, env: dict | None = None) -> list[dict] | str:
    """Run `python -m module SPEC OUT` in `world` fresh processes (spec gets rank, world and a port); their
    results in rank order, or the first failing rank's last line of stderr."""
    port = free_port()
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in range(world):
            out = os.path.join(tmp, f"rank{rank}.json")
            rank_spec = dict(spec, rank=rank, world=world, port=port)
            procs.append((out, subprocess.Popen([sys.executable, "-m", module, json.dumps(rank_spec), out],
                                                env=dict(os.environ, **(env or {})), stderr=subprocess.PIPE,
                                                text=True)))
        results, errors = [], []
        for out, proc in procs:
            _, err = proc.communicate()
            if proc.returncode:
                errors.append(err.strip().splitlines()[-1] if err.strip() else f"exit code {proc.returncode}")
            else:
                with open(out) as f:
                    results.append(json.load(f))
    return errors[0] if errors else results


def worker_main(fn) -> None:
    """The worker's entry: python -m MODULE SPEC_JSON OUT_JSON."""
    atomic_write_text(sys.argv[2], json.dumps(fn(json.loads(sys.argv[1]))))


def machine(device) -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
