"""Rank-aware logging for every megaclass process.

Modules log as usual (`log = logging.getLogger(__name__)`). An entry point calls `setup()` once: the
`megaclass` logger then writes to stderr, one line a record,

    09:51:02 [rank 1/2] WARNING megaclass.data.dataset: 3 unreadable images skipped

with INFO and below from rank 0 only (P ranks would repeat each other P times) and WARNING and above
from every rank (a rank's own trouble must be seen even when rank 0 has none). `all_ranks=True`, or
MEGACLASS_LOG_ALL_RANKS=1, lets every rank's INFO through too. A command's intended output (a table,
"wrote FILE") stays on stdout; what it says about its progress goes here.
"""
from __future__ import annotations

import logging
import os
import sys

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


def rank_and_world() -> tuple[int, int]:
    """This process's (rank, world size): the process group's once it exists, else the launcher's
    environment (deepspeed/torchrun: RANK, WORLD_SIZE; mpirun: its own variables), else (0, 1)."""
    comm = sys.modules.get("megaclass.parallel.comm")  # only when loaded: logging never imports torch
    if comm is not None and comm.is_initialized():
        return comm.rank(), comm.world_size()
    for rank_var, size_var in (("RANK", "WORLD_SIZE"), *zip(_MPI_RANK_VARS, _MPI_SIZE_VARS)):
        if rank_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ.get(size_var, "1"))
    return 0, 1


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record (a test's capture, a redirect)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


class RankFilter(logging.Filter):
    """Adds `record.rank` ("r/P"); passes INFO and below on rank 0 only unless `all_ranks`."""

    def __init__(self, all_ranks: bool = False):
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        rank, world = rank_and_world()
        record.rank = f"{rank}/{world}"
        return self.all_ranks or rank == 0 or record.levelno >= logging.WARNING


FORMAT = "%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"


def setup(level: int | str = logging.INFO, all_ranks: bool | None = None) -> logging.Logger:
    """Send the `megaclass` logger's records at `level` and above to stderr, rank-aware. Idempotent:
    a second call only changes the level and the ranks."""
    if all_ranks is None:
        all_ranks = os.environ.get("MEGACLASS_LOG_ALL_RANKS", "") not in ("", "0")
    logger = logging.getLogger("megaclass")
    logger.setLevel(level)
    handler = next((h for h in logger.handlers if getattr(h, "megaclass", False)), None)
    if handler is None:
        handler = _Stderr()
        handler.megaclass = True
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    handler.filters = [RankFilter(all_ranks)]
    return logger
