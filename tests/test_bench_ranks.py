"""The benchmarks' rank launcher: results in rank order from fresh processes that really form a group;
a rank that fails is named with its error; a rank that writes a lot to stderr blocks nobody."""
import os
import sys

import pytest

from megaclass.bench.ranks import RankFailed, launch

ENV = {"PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      os.path.dirname(os.path.abspath(__file__))]), "OMP_NUM_THREADS": "1"}


def sum_of_ranks(spec):
    """All-reduce of rank + 1 over the group; rank 1 first writes 1 MB to stderr (more than a pipe holds)."""
    import torch

    from megaclass.parallel import comm

    comm.init_group("gloo", spec["rank"], spec["world"], port=spec["port"])
    if spec["rank"] == 1:
        sys.stderr.write("x" * 2**20 + "\n")
        sys.stderr.flush()
    if spec.get("fail_rank") == spec["rank"]:
        raise ValueError(f"bad input on rank {spec['rank']}")
    total = comm.all_reduce_(torch.tensor([spec["rank"] + 1.0]))
    comm.destroy_group()
    return {"rank": spec["rank"], "sum": float(total), "extra": spec["extra"]}


@pytest.mark.timeout(120)
def test_launch_runs_every_rank_in_a_group_and_returns_in_rank_order():
    results = launch("test_bench_ranks:sum_of_ranks", {"extra": "x"}, 3, env=ENV)
    assert results == [{"rank": r, "sum": 6.0, "extra": "x"} for r in range(3)]


@pytest.mark.timeout(120)
def test_a_failing_rank_is_named_with_its_error():
    with pytest.raises(RankFailed, match=r"rank 0: .*ValueError: bad input on rank 0"):
        launch("test_bench_ranks:sum_of_ranks", {"extra": None, "fail_rank": 0}, 1, env=ENV)
