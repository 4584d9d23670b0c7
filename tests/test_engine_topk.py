"""Top-k prediction over a class-sharded head equals softmax top-k over all classes.
(Its own light module: spawned ranks import only torch and megaclass.nn.)"""
import torch
from dist_utils import run_ranks

from megaclass.nn import sharded_topk
from megaclass.nn import shard_range

CLASSES, D, ROWS, K = 13, 6, 9, 5


def _problem():
    g = torch.Generator().manual_seed(0)
    return torch.randn(ROWS, D, generator=g), torch.randn(CLASSES, D, generator=g), torch.randn(CLASSES, generator=g)


def _topk_ranks(rank, world):
    x, w, b = _problem()
    lo, hi = shard_range(CLASSES, rank, world)
    probs, classes = sharded_topk(x, w[lo:hi], b[lo:hi], lo, K, chunk_rows=4)
    return probs.numpy(), classes.numpy()


def test_sharded_topk_equals_softmax_topk_over_all_classes():
    x, w, b = _problem()
    ref_probs, ref_classes = torch.softmax((x.double() @ w.double().T + b.double()), dim=1).topk(K, dim=1)
    # 3 ranks hold 5, 4 and 4 classes: two ranks have fewer than k candidates
    for probs, classes in run_ranks(_topk_ranks, 3):
        assert (torch.from_numpy(classes) == ref_classes).all()
        # float32 logits of 6 terms against float64: 1e-5 relative is ~100 float32 ulps
        torch.testing.assert_close(torch.from_numpy(probs).double(), ref_probs, rtol=1e-5, atol=1e-6)




def _label_logprob_ranks(rank, world):
    x, w, b = _problem()
    labels = torch.arange(ROWS) * 5 % CLASSES  # labels on every rank's shard, first and last class included
    lo, hi = shard_range(CLASSES, rank, world)
    _, _, log_p = sharded_topk(x, w[lo:hi], b[lo:hi], lo, K, chunk_rows=4, labels=labels)
    return log_p.numpy()


def test_label_log_probability_equals_log_softmax_over_all_classes():
    x, w, b = _problem()
    labels = torch.arange(ROWS) * 5 % CLASSES
    ref = torch.log_softmax(x.double() @ w.double().T + b.double(), dim=1).gather(1, labels[:, None]).squeeze(1)
    for world in (1, 3):
        for log_p in run_ranks(_label_logprob_ranks, world):
            torch.testing.assert_close(torch.from_numpy(log_p).double(), ref, rtol=1e-5, atol=1e-5)
