"""The rank-aware logger: rank 0 tells the progress, every rank its warnings and errors, each line with
its time, rank, level and module."""
import logging
import re

import pytest

from megaclass import log


@pytest.fixture
def logger(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MEGACLASS_LOG_ALL_RANKS"):
        monkeypatch.delenv(var, raising=False)
    log.setup(logging.INFO, all_ranks=False)
    yield logging.getLogger("megaclass.engine.trainer")
    log.setup(logging.INFO, all_ranks=False)


def test_rank0_logs_progress_other_ranks_only_warnings_and_errors(logger, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    logger.info("step %d", 3)
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(r"\d\d:\d\d:\d\d \[rank 0/2\] INFO megaclass.engine.trainer: step 3", line), line
    monkeypatch.setenv("RANK", "1")
    logger.info("step %d", 3)
    assert capsys.readouterr().err == ""
    logger.warning("3 unreadable images")
    logger.error("checkpoint corrupt")
    err = capsys.readouterr().err
    assert "[rank 1/2] WARNING megaclass.engine.trainer: 3 unreadable images" in err
    assert "[rank 1/2] ERROR megaclass.engine.trainer: checkpoint corrupt" in err


def test_all_ranks_lets_every_rank_log_and_setup_is_idempotent(logger, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MEGACLASS_LOG_ALL_RANKS", "1")
    log.setup()
    log.setup()
    logger.info("hello")
    assert capsys.readouterr().err.count("[rank 1/2] INFO megaclass.engine.trainer: hello") == 1


def test_mpi_ranks_are_read_from_the_launchers_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert log.rank_and_world() == (3, 4)
