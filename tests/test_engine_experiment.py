"""The experiment's single-process steps: a failure on rank 0 stops every rank with the same error."""
import pytest
from dist_utils import run_ranks


def _step_on_rank0(rank, world, fail):
    from megaclass.engine.experiment import StepFailed, on_rank0

    ran = []

    def step():
        ran.append(rank)
        if fail:
            raise ValueError("knn.tsv:3: bad row")

    try:
        on_rank0("semantics", step, "cpu")
    except StepFailed as exc:
        return ran, str(exc)
    return ran, None


@pytest.mark.timeout(120)
def test_a_rank0_step_that_fails_raises_on_every_rank():
    ok = run_ranks(_step_on_rank0, 2, False)
    assert ok == [([0], None), ([], None)]
    failed = run_ranks(_step_on_rank0, 2, True)
    assert failed[0] == ([0], "semantics failed on rank 0 (ValueError: knn.tsv:3: bad row)")
    assert failed[1] == ([], "semantics failed on rank 0 (see rank 0's error)")
