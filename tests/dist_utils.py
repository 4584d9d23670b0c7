"""Run a function on P gloo ranks in spawned CPU processes (tests only).

`run_ranks(fn, P, *args)` calls `fn(rank, P, *args)` in each process with the default group
initialized (gloo; `backend="nccl"` puts rank r on cuda:r instead), and returns the list of each
rank's return value. An exception on any rank fails the call with that rank's traceback; a rank that
dies without reporting (a crash, a kill) fails it with its exit code instead of hanging the wait for it.
The ranks meet through a file in a fresh temporary folder, not a TCP port: no port chosen here can be
taken by another process (another test run on the same machine) before the group binds it.
"""
from __future__ import annotations

import os
import queue as queues
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megaclass.parallel.comm import free_port  # noqa: F401  (re-exported for the launcher tests)


def _entry(rank, world, store, fn, args, results, backend):
    os.environ.update(OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        results.put((rank, True, result))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 300.0, backend: str = "gloo"):
    ctx = mp.get_context("spawn")
    results_queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(r, world, store, fn, args, results_queue, backend))
                 for r in range(world)]
        for p in procs:
            p.start()
        results, errors, reported = {}, [], set()
        grace = None  # once a rank failed, its peers may wait in a collective for ever: a minute to report
        while len(reported) < world and (grace is None or time.monotonic() < grace):
            try:
                rank, ok, value = results_queue.get(timeout=1.0)
            except queues.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if r not in reported and p.exitcode not in (None, 0)]
                for r, code in dead:
                    reported.add(r)
                    errors.append(f"rank {r}: exited with code {code} before reporting")
            else:
                reported.add(rank)
                (results.__setitem__(rank, value) if ok else errors.append(f"rank {rank}:\n{value}"))
            if errors and grace is None:
                grace = time.monotonic() + 60
        for p in procs:
            p.join(timeout if not errors else 5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
