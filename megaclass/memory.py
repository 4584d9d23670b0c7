"""The one memory probe: what a run, a benchmark or a test reports as memory.

CUDA: bytes the caching allocator handed out (`torch.cuda.max_memory_allocated`). CPU: the process's
resident set, now (`/proc/self/statm`) or at its peak (VmHWM of `/proc/self/status`), or the part of it
a forked worker does not share (`private_bytes`);
`MemoryProbe`: the peak added since a point (a benchmark's inputs), resettable.
"""
from __future__ import annotations

import os
import resource


def rss_bytes() -> int:
    """This process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes(children: bool = False) -> int:
    """The peak resident set of this process (since a `MemoryProbe` reset, if any), or with `children` of its
    largest finished child. Its own is VmHWM, not getrusage: Linux carries ru_maxrss across exec, so a child
    that Python's subprocess starts (vfork, then exec) would report at least its parent's peak."""
    if children:
        return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def private_bytes() -> int:
    """This process's private resident memory (Private_Clean + Private_Dirty of /proc/self/smaps_rollup):
    what a forked worker adds to the machine beyond the pages it still shares with its parent."""
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))


def peak_memory_bytes(device) -> int:
    """Peak memory on `device` (a torch.device): CUDA's allocator peak, else the process's peak RSS."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


class MemoryProbe:
    """The peak memory added since `reset()`: CUDA, torch's max allocated; CPU, the resident set's high-water
    mark (reset through /proc/self/clear_refs, so that earlier peaks, e.g. a compiler's, do not count)."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.reset()

    def reset(self) -> None:
        if self.cuda:
            import torch

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
        if self.cuda:
            import torch

            peak = torch.cuda.max_memory_allocated()
        else:
            peak = peak_rss_bytes()  # VmHWM: the high-water mark clear_refs resets (getrusage's is not)
        return max(0, peak - self.base)
