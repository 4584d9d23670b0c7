"""A training step with 2^20 classes on 2 CPU ranks: each holds half the classifier, the loss is the
plain cross-entropy over all 1,048,576 classes."""
import os

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_ranks
from engine_helpers import FlatLinear, random_items

from megaclass.engine.config import config_from_dict
from megaclass.seeding import derive_seed

CLASSES, D, MICRO = 1 << 20, 32, 8


def _config(run_dir):
    return config_from_dict({"run_dir": run_dir, "data": {"num_workers": 0}, "head": {"chunk_size": 8},
                             "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "schedule": "constant"},
                             "train": {"micro_batch_size": MICRO, "epochs": 2, "progress": False}})


def _step(rank, world, run_dir):
    os.environ["LOCAL_RANK"] = str(rank)
    from megaclass.engine.trainer import TrainData, Trainer

    items = random_items(2 * MICRO, 1000, shape=(3, 2, 2))
    items.labels = items.labels * 1000 + 7  # labels spread over the whole class range
    torch.manual_seed(0)
    trainer = Trainer(_config(run_dir), TrainData(items, CLASSES, items.labels), backbone=FlatLinear(12, D))
    trainer.save = lambda: None  # a 2^20-row checkpoint is not what this test is about
    rows = trainer.fit()
    return {"losses": [r["loss"] for r in rows], "rows": trainer.head.weight.shape[0]}


@pytest.mark.timeout(240)
def test_one_million_classes_on_two_ranks(tmp_path):
    results = run_ranks(_step, 2, str(tmp_path))
    assert [r["rows"] for r in results] == [CLASSES // 2, CLASSES // 2]
    # reference: the first step's loss from the whole 2^20-class classifier in one float64 process
    items = random_items(2 * MICRO, 1000, shape=(3, 2, 2))
    labels = items.labels * 1000 + 7
    torch.manual_seed(0)
    backbone = FlatLinear(12, D).double()
    torch.manual_seed(derive_seed(0, "head"))  # as Trainer seeds the head (train.seed = 0)
    from megaclass.nn import ShardedLinearCrossEntropy

    weight = ShardedLinearCrossEntropy(D, CLASSES, bias=False).weight.detach().double()
    from megaclass.engine.data import epoch_order

    order = epoch_order(2 * MICRO, 0, 0)
    with torch.no_grad():
        logits = backbone(items.images[order].double()) @ weight.T
        expected = float(F.cross_entropy(logits, labels[order]))
    for r in results:
        # float32 over 2^20 classes against float64: lse error ~1e-6 relative
        assert r["losses"][0] == pytest.approx(expected, rel=1e-5)
        assert r["losses"][1] < r["losses"][0]  # step 2 sees the same 16 images, after one descent step
