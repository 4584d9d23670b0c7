"""The autograd collectives against single-process references (exact: no reduction order issues
beyond a sum of P float64 terms)."""
import torch

from dist_utils import run_ranks
from megaclass.parallel import comm


def _pairs(rank, world):
    torch.manual_seed(0)
    full = torch.randn(world * 3, 4, dtype=torch.float64)
    upstream = torch.randn(world * 3, 4, dtype=torch.float64)
    mine = full[rank * 3:(rank + 1) * 3].clone().requires_grad_()
    gathered = comm.gather_rows(mine)
    assert torch.equal(gathered, full)
    # every rank sees a different upstream: the backward must sum them (reduce-scatter)
    (gathered * upstream * (rank + 1)).sum().backward()
    expected = (upstream * sum(r + 1 for r in range(world)))[rank * 3:(rank + 1) * 3]
    assert torch.allclose(mine.grad, expected)
    return comm.gather_ints([rank, 10 * rank])


def test_collective_pairs_three_ranks():
    tables = run_ranks(_pairs, 3)
    assert all(t == [[0, 0], [1, 10], [2, 20]] for t in tables)


def test_single_process_is_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert comm.gather_rows(x) is x and comm.world_size() == 1
    assert comm.gather_ints([4, 5]) == [[4, 5]]
