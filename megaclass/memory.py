"""The one memory probe: what a run, a benchmark or a test reports as memory.

CUDA: bytes the caching allocator handed out (`torch.cuda.max_memory_allocated`). CPU: the process's
resident set, now (`/proc/self/statm`) or at its peak (`getrusage`, which Linux reports in KiB).
"""
from __future__ import annotations

import os
import resource


def rss_bytes() -> int:
    """This process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes(children: bool = False) -> int:
    """The peak resident set of this process, or with `children` of its largest finished child."""
    return resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_bytes(device) -> int:
    """Peak memory on `device` (a torch.device): CUDA's allocator peak, else the process's peak RSS."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()
