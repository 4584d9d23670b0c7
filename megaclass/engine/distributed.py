"""Process-group set-up for every launcher: `deepspeed`, `torchrun`, `mpirun` (mpi4py discovery) or a
plain `python` run (a group of one)."""
from __future__ import annotations

import os
from datetime import timedelta

import deepspeed
import torch

from megaclass.engine import faults
from megaclass.engine.config import Config
from megaclass.parallel import comm

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def init(cfg: Config) -> None:
    """Join (or form) the job's process group, with `parallel.timeout_s` as the collective timeout;
    start this rank's heartbeat (`parallel.heartbeat_s`) and take SIGTERM/SIGUSR1 as a preemption
    notice (`engine.faults`)."""
    faults.install_signal_handlers()
    launched = "RANK" in os.environ or any(v in os.environ for v in _MPI_RANK_VARS)
    if not launched:  # plain `python launch/train.py`: one rank
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(comm.free_port()))
    backend = cfg.parallel.backend or deepspeed.get_accelerator().communication_backend_name()
    port = {} if "RANK" in os.environ else {"distributed_port": _mpi_store_port()}
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, verbose=False,
                               timeout=timedelta(seconds=cfg.parallel.timeout_s), **port)
    unlink_shm_buffer()
    if "OMP_NUM_THREADS" not in os.environ:  # ranks of one node share its cores instead of oversubscribing
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    faults.start_heartbeat(cfg.parallel.heartbeat_s)


def unlink_shm_buffer() -> None:
    """Unlink this rank's buffer of DeepSpeed's CPU shared-memory allreduce (67 MB in /dev/shm, named
    after the job's address, port and rank), which DeepSpeed never unlinks: every job left them behind
    until /dev/shm filled. Once every rank is past `init_distributed` each has mapped every buffer, and
    a mapped segment lives on until its last process unmaps it, so only the name goes."""
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{comm.rank()}")
    comm.barrier()
    try:
        os.unlink(name)
    except FileNotFoundError:  # ranks on several nodes, or no shared-memory op: nothing was made
        pass


def _mpi_store_port() -> int:
    """The rendezvous port of an mpirun job: MASTER_PORT when it is set, else a port free on rank 0's
    host, sent to every rank over MPI. (DeepSpeed's MPI discovery would give every job port 29500, so
    two jobs on one node, or one beside a `deepspeed` job, would meet in each other's store.)"""
    if "MASTER_PORT" in os.environ:
        return int(os.environ["MASTER_PORT"])
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    return world.bcast(comm.free_port(host="") if world.Get_rank() == 0 else None, root=0)


def finish() -> None:
    """Leave the process group together: a rank that exits with its group alive can abort in the
    backend's threads at interpreter exit ("terminate called without an active exception")."""
    faults.stop_heartbeat()
    comm.barrier()
    comm.destroy_group()
