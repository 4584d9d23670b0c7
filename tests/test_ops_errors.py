"""Bad input to the fused op: a ValueError that names the argument (and the row, for targets and weights)."""
from __future__ import annotations

import math

import pytest
import torch

from megaclass.ops import linear_cross_entropy


def _args():
    return dict(hidden=torch.randn(6, 4), weight=torch.randn(10, 4), target=torch.tensor([0, 1, 2, 9, -100, 3]),
                sample_weight=torch.ones(6))


def _call(**changes):
    args = _args()
    kwargs = {k: changes.pop(k) for k in list(changes) if k not in args}
    args.update(changes)
    return linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("target"), args.pop("sample_weight"),
                                **kwargs)


CASES = [
    (dict(target=torch.tensor([0, 1, 10, 9, -100, 3])), r"target\[2\] = 10 is outside \[0, 10\)"),
    (dict(target=torch.tensor([0, 1, 2, -5, -100, 3])), r"target\[3\] = -5"),
    (dict(target=torch.tensor([0, 1, 2, 3, 4, 5]), class_start=3), r"class shards do not tile"),
    (dict(sample_weight=torch.tensor([1.0, 1.0, -0.5, 1.0, 1.0, 1.0])), r"sample_weight.*row 2 holds -0.5"),
    (dict(sample_weight=torch.tensor([1.0, math.nan, 1.0, 1.0, 1.0, 1.0])), r"sample_weight.*row 1 holds nan"),
    (dict(sample_weight=torch.tensor([1.0, 1.0, 1.0, math.inf, 1.0, 1.0])), r"sample_weight.*row 3 holds inf"),
    (dict(sample_weight=torch.ones(5)), r"sample_weight must be a tensor of shape \[6\]"),
    (dict(sample_weight=torch.ones(6, dtype=torch.int64)), r"sample_weight must be floating point"),
    (dict(hidden=torch.randn(6, 5)), r"weight has 4 features per class but hidden has D=5"),
    (dict(hidden=torch.randn(6)), r"hidden must be a 2-D tensor"),
    (dict(weight=torch.randn(10, 4, dtype=torch.float64)), r"weight dtype torch.float64 differs"),
    (dict(hidden=torch.randint(0, 3, (6, 4))), r"hidden must be float32"),
    (dict(target=torch.zeros(5, dtype=torch.int64)), r"target must be a tensor of shape \[6\]"),
    (dict(target=torch.zeros(6)), r"target must hold integer class ids"),
    (dict(bias=torch.zeros(9)), r"bias must be a tensor of shape \[10\]"),
    (dict(bias=torch.zeros(10, dtype=torch.float16)), r"bias must match hidden's dtype"),
    (dict(reduction="avg"), r"reduction must be one of"),
    (dict(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\]"),
    (dict(chunk_size=0), r"chunk_size must be a positive int"),
    (dict(class_start=-1), r"class_start must be a non-negative int"),
    (dict(hidden_grad="half"), r"hidden_grad must be one of"),
    (dict(implementation="cuda"), r"implementation must be one of"),
]


@pytest.mark.parametrize("changes,message", CASES, ids=[m[:28] for _, m in CASES])
def test_bad_input_raises_value_error(changes, message):
    with pytest.raises(ValueError, match=message):
        _call(**changes)


def test_meta_device_mismatch_names_the_argument():
    with pytest.raises(ValueError, match="weight is on meta but hidden is on cpu"):
        _call(weight=torch.randn(10, 4, device="meta"))


def test_valid_call_still_works():
    loss = _call()
    assert torch.isfinite(loss)
