"""Run a function on P gloo ranks in spawned CPU processes (tests only).

`run_ranks(fn, P, *args)` calls `fn(rank, P, *args)` in each process with the default group
initialized (gloo; `backend="nccl"` puts rank r on cuda:r instead), and returns the list of each
rank's return value. An exception on any rank fails the call with that rank's traceback.
"""
from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megaclass.parallel.comm import free_port


def _entry(rank, world, port, fn, args, queue, backend):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world)
        result = fn(rank, world, *args)
        queue.put((rank, True, result))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 300.0, backend: str = "gloo"):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue, backend)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    for _ in range(world):
        rank, ok, value = queue.get()
        (results.__setitem__(rank, value) if ok else errors.append(f"rank {rank}:\n{value}"))
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
