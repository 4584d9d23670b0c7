"""Training from shards: the global order of an epoch (seeded shard order, then a shuffle buffer), equal
steps on every rank, exact mid-epoch resume at the same and at another world size (loader and Trainer), class-balanced draws."""
import os
from collections import Counter

import numpy as np
import pytest
import torch
from dist_utils import run_ranks
from engine_helpers import FlatLinear, write_webvision
from torch.utils.data import DataLoader

from megaclass.data import ClassBalancedSampler
from megaclass.data.shards import ShardDataset, convert, load_shards, shard_epoch_order
from megaclass.engine.config import config_from_dict
from megaclass.engine.data import RankBatches, SeededItems, epoch_order_fn
from megaclass.engine.trainer import TrainData, Trainer

SIZES = [14, 14, 14, 14, 8]  # 64 images in 5 shards of unequal size
BUFFER = 10


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_webvision(str(root / "wv"), classes=4, per_class=16, val_per_class=2, size=16)
    index = convert(root / "wv", root / "out", per_shard=14, progress=False)
    assert [s["samples"] for s in index["splits"]["train"]["shards"]] == SIZES
    return str(root / "out")


def test_an_epoch_is_the_shards_in_a_seeded_order_then_a_shuffle_buffer():
    starts = np.cumsum([0] + SIZES)
    shard_of = np.repeat(np.arange(len(SIZES)), SIZES)
    a, b = shard_epoch_order(SIZES, 7, 0, BUFFER), shard_epoch_order(SIZES, 7, 0, BUFFER)
    assert torch.equal(a, b) and not torch.equal(a, shard_epoch_order(SIZES, 7, 1, BUFFER))
    assert not torch.equal(a, shard_epoch_order(SIZES, 8, 0, BUFFER))
    for epoch in range(4):
        order = shard_epoch_order(SIZES, 7, epoch, BUFFER).numpy()
        assert sorted(order) == list(range(starts[-1]))  # every image once
        # a shard's images leave within its span plus the two buffers it may overlap: reads go shard by shard
        for s in range(len(SIZES)):
            at = np.flatnonzero(shard_of[order] == s)
            assert at[-1] - at[0] < SIZES[s] + 2 * BUFFER
        # and the buffer's output is not the stream itself
        assert not all((np.diff(order[shard_of[order] == s]) == 1).all() for s in range(len(SIZES)))


def test_class_balanced_on_shards_draws_classes_as_evenly_as_the_file_sampler():
    # classes grouped by shard, as a web filelist grouped by query gives them: 120, 50, 20, 10 images
    labels = torch.tensor([0] * 120 + [1] * 50 + [2] * 20 + [3] * 10)
    sizes = [40, 40, 40, 50, 30]
    shard_hist, file_hist = np.zeros(4), np.zeros(4)
    for epoch in range(100):
        order = shard_epoch_order(sizes, 3, epoch, 25, labels)
        assert len(order) == len(labels)
        shard_hist += np.bincount(labels[order].numpy(), minlength=4)
        sampler = ClassBalancedSampler(labels.tolist(), seed=3)
        sampler.set_epoch(epoch)
        file_hist += np.bincount(labels[list(sampler)].numpy(), minlength=4)
    shard_share, file_share = shard_hist / shard_hist.sum(), file_hist / file_hist.sum()
    # 20,000 draws each: a class's share has a binomial standard deviation of 0.3 points around 1/4
    assert np.abs(shard_share - 0.25).max() < 0.015 and np.abs(file_share - 0.25).max() < 0.015
    plain = np.bincount(labels[shard_epoch_order(sizes, 3, 0, 25)].numpy(), minlength=4)
    assert plain.tolist() == [120, 50, 20, 10]  # without class_balanced: each image once


def _served(dataset, rank, world, micro, order_fn, start, stop, workers=2):
    """[(step, paths of this rank's micro-batch, its pixels)] through the trainer's kind of loader."""
    sampler = RankBatches(len(dataset), rank, world, micro, total_micro_steps=stop, order_fn=order_fn, start=start)
    loader = DataLoader(SeededItems(dataset, seed=5), batch_sampler=sampler, num_workers=workers)
    return [(start + j, [dataset.items[i][0] for i in index], images)
            for j, (images, _, index) in enumerate(loader)]


def test_a_run_stopped_on_two_ranks_and_resumed_on_three_sees_the_uninterrupted_runs_images(shard_dir):
    dataset = ShardDataset(load_shards(shard_dir), "train", 16, train=True)  # no preload: reads the tars
    order_fn = epoch_order_fn(dataset, seed=5, buffer=BUFFER)
    steps, stop_at = 25, 13  # 10 global batches of 6 an epoch: stop in the middle of the second epoch
    reference = _served(dataset, 0, 1, 6, order_fn, 0, steps, workers=0)
    first = [_served(dataset, r, 2, 3, order_fn, 0, stop_at) for r in range(2)]
    second = [_served(dataset, r, 3, 2, order_fn, stop_at, steps) for r in range(3)]
    pieces = list(zip(*first)) + list(zip(*second))  # per step: each rank's (step, paths, images)
    assert len(pieces) == steps
    for (step, paths, images), per_rank in zip(reference, pieces):
        assert [p for _, rank_paths, _ in per_rank for p in rank_paths] == paths, step
        assert torch.equal(torch.cat([x for _, _, x in per_rank]), images), step  # the same pixels, augmentation included
    keys = Counter(p for piece in pieces for _, rank_paths, _ in piece for p in rank_paths)
    assert keys == Counter(p for _, paths, _ in reference for p in paths)
    assert len(keys) == 64  # two full epochs went by: every image, none twice within an epoch


def _trainer(shard_dir, run_dir, max_steps, workers, micro=2, epochs=1.0):
    cfg = config_from_dict({
        "run_dir": run_dir, "head": {"bias": True},
        "data": {"num_workers": workers, "shards": shard_dir, "shuffle_buffer": BUFFER, "image_size": 16},
        "optim": {"name": "sgd", "lr": 0.3, "momentum": 0.9, "warmup_steps": 2, "schedule": "cosine"},
        "train": {"micro_batch_size": micro, "grad_accum": 2, "epochs": epochs, "max_steps": max_steps, "progress": False},
    })
    shards = load_shards(shard_dir)
    dataset = ShardDataset(shards, "train", 16, train=True)
    labels = torch.from_numpy(shards.columns["train"].label)
    weights = torch.linspace(0.2, 1.5, len(labels))
    torch.manual_seed(0)
    return Trainer(cfg, TrainData(dataset, len(shards.classes), labels, weights), backbone=FlatLinear(768, 8, dropout=0.3))


def _losses(rows):
    return {r["step"]: r["loss"] for r in rows}


def _three_ranks_two_workers(rank, world, shard_dir, root):
    os.environ["LOCAL_RANK"] = str(rank)
    t = _trainer(shard_dir, f"{root}/three", max_steps=0, workers=2, micro=1)
    rows = t.fit()
    t.close()
    return {"steps": t.step, "last": t.last_step, "losses": _losses(rows)}


@pytest.mark.timeout(600)
def test_three_ranks_with_two_workers_over_five_unequal_shards_run_the_same_steps(shard_dir, tmp_path):
    got = run_ranks(_three_ranks_two_workers, 3, shard_dir, str(tmp_path))
    # 64 images, global batch 3 ranks × 1 × 2 accumulation = 6: 10 steps, the last 4 images dropped
    assert [g["steps"] for g in got] == [10, 10, 10] and [g["last"] for g in got] == [10, 10, 10]
    assert got[0]["losses"] == got[1]["losses"] == got[2]["losses"]  # one global loss, every rank


def _split_run(rank, world, shard_dir, root, max_steps):
    os.environ["LOCAL_RANK"] = str(rank)
    t = _trainer(shard_dir, f"{root}/split", max_steps=max_steps, workers=1, epochs=2)
    rows = _losses(t.fit())
    t.close()
    if max_steps < 6:
        return rows
    full = _trainer(shard_dir, f"{root}/full", max_steps=6, workers=1, epochs=2)
    uninterrupted = _losses(full.fit())
    full.close()
    return {"resumed": rows, "uninterrupted": uninterrupted}


@pytest.mark.timeout(600)
def test_losses_after_a_mid_epoch_resume_equal_an_uninterrupted_runs(shard_dir, tmp_path):
    first = run_ranks(_split_run, 2, shard_dir, str(tmp_path), 5)  # 8 steps an epoch: stops mid-epoch
    second = run_ranks(_split_run, 2, shard_dir, str(tmp_path), 6)
    for rank in range(2):
        assert sorted(first[rank]) == [1, 2, 3, 4, 5] and sorted(second[rank]["resumed"]) == [6]
        assert {**first[rank], **second[rank]["resumed"]} == second[rank]["uninterrupted"]


def test_an_image_that_does_not_decode_is_skipped_and_counted_across_workers_as_on_files(tmp_path):
    from megaclass.data import ImageDataset, load_webvision

    root = write_webvision(str(tmp_path / "wv"), classes=3, per_class=5, val_per_class=1, size=16)
    bad = tmp_path / "wv/google/q0002/1_2.jpg"
    data = bad.read_bytes()
    scan = data.index(b"\xff\xda")  # start of the entropy-coded pixels: the header before it opens
    bad.write_bytes(data[: scan + (len(data) - scan) // 2])
    convert(root, tmp_path / "out", per_shard=4, progress=False)
    served = {}
    for name, dataset in (("files", ImageDataset(root, load_webvision(root).train_items(), 16, train=False)),
                          ("shards", ShardDataset(load_shards(tmp_path / "out"), "train", 16, train=False))):
        sampler = RankBatches(len(dataset), 0, 1, 3)  # one prediction pass, 5 batches
        loader = DataLoader(SeededItems(dataset, seed=0), batch_sampler=sampler, num_workers=2)
        batches = list(loader)
        served[name] = (torch.cat([i for _, _, i in batches]).tolist(), torch.cat([x for x, _, _ in batches]))
        assert int(dataset.skips.sum()) == 1, name  # counted in a worker, seen here
    assert served["files"][0] == served["shards"][0] == [0, 1, 2, 3, 4, 5, 6, 8, 8, 9, 10, 11, 12, 13, 14]
    assert torch.equal(served["files"][1], served["shards"][1])


# End to end at another world size: the real Trainer on shards at ZeRO 1 with SGD + momentum (the resume
# goes through DeepSpeed's universal checkpoint), the same global batch of 12 as 3 ranks × 4 and 2 × 6,
# with dropout: model.drop_rate's masks are keyed by each image's place in the epoch, not drawn per rank.
GLOBAL, STOP, STEPS = 12, 7, 10  # 64 images: 5 steps an epoch, 2 epochs; stopped in the second epoch
DROP_RATE = 0.3
# The losses differ only by the order of fp32 sums (gloo all-reduces of 2 or 3 parts, the head's classes
# in 2 or 3 shards), carried through the steps before the resume: measured up to 1.3e-7 relative (6.9e-7
# without dropout). Masks drawn per rank (torch's generator seeded per micro-step, as before model.drop_rate
# was keyed per image) make them differ by up to 0.40 relative.
LOSS_RTOL = 1e-5


class _Tap:
    """The loader's batches, each one's served sample indices noted in `seen`. A plain class: a class made
    per call would sit in a reference cycle holding the loader, whose worker then outlives `fit`."""

    def __init__(self, batches, seen: list):
        self.batches, self.seen = batches, seen

    def __next__(self):
        batch = next(self.batches)
        self.seen.extend(batch[2].tolist())
        return batch


class _Recording(Trainer):
    """The trainer as it is, noting the sample index each micro-batch served (what weights and labels are
    looked up by), per optimizer step, and how many of the features that went into the head were dropped
    (FlatLinear's tanh features are zero only where dropout zeroed them)."""

    seen: dict
    dropped = elements = 0

    def train_step(self, batches):
        return super().train_step(_Tap(batches, self.seen.setdefault(self.step + 1, [])))

    def observe(self, features, labels, index):
        self.dropped += int((features == 0).sum())
        self.elements += features.numel()


def _keyed_run(rank, world, shard_dir, run_dir, max_steps):
    os.environ["LOCAL_RANK"] = str(rank)
    cfg = config_from_dict({
        "run_dir": run_dir, "model": {"drop_rate": DROP_RATE}, "head": {"bias": True},
        "data": {"num_workers": 0, "shards": shard_dir, "shuffle_buffer": BUFFER, "image_size": 16},
        "parallel": {"zero_stage": 1},
        "optim": {"name": "sgd", "lr": 0.3, "momentum": 0.9, "warmup_steps": 2, "schedule": "cosine"},
        "train": {"micro_batch_size": GLOBAL // world, "epochs": 2, "max_steps": max_steps, "progress": False},
    })
    shards = load_shards(shard_dir)
    dataset = ShardDataset(shards, "train", 16, train=True)
    labels = torch.from_numpy(shards.columns["train"].label)
    torch.manual_seed(0)
    t = _Recording(cfg, TrainData(dataset, len(shards.classes), labels, torch.linspace(0.2, 1.5, len(labels))),
                   backbone=FlatLinear(768, 8))
    t.seen = {}
    losses = _losses(t.fit())
    t.close()
    keys = {step: [dataset.columns.paths[i] for i in index] for step, index in t.seen.items()}
    return {"losses": losses, "keys": keys, "dropped": t.dropped / t.elements}


def _resume_then_uninterrupted(rank, world, shard_dir, root):
    return (_keyed_run(rank, world, shard_dir, f"{root}/split", 0),
            _keyed_run(rank, world, shard_dir, f"{root}/whole", 0))


def _global(per_rank, step):
    """The global batch of `step`: the ranks' micro-batches in rank order."""
    return [k for got in per_rank for k in got["keys"][step]]


@pytest.mark.timeout(600)
def test_a_trainer_stopped_on_two_ranks_and_resumed_on_three_sees_and_scores_as_an_uninterrupted_one(shard_dir, tmp_path):
    first = run_ranks(_keyed_run, 2, shard_dir, f"{tmp_path}/split", STOP)
    resumed, whole = zip(*run_ranks(_resume_then_uninterrupted, 3, shard_dir, str(tmp_path)))
    assert os.path.isdir(f"{tmp_path}/split/checkpoints/step-{STOP:08d}/universal")  # the other world's load
    assert [sorted(g["keys"]) for g in first] == [list(range(1, STOP + 1))] * 2
    assert [sorted(g["keys"]) for g in resumed] == [list(range(STOP + 1, STEPS + 1))] * 3
    assert [sorted(g["keys"]) for g in whole] == [list(range(1, STEPS + 1))] * 3
    interrupted = [_global(first, s) for s in range(1, STOP + 1)] + [_global(resumed, s) for s in range(STOP + 1, STEPS + 1)]
    uninterrupted = [_global(whole, s) for s in range(1, STEPS + 1)]
    assert all(len(batch) == GLOBAL for batch in interrupted + uninterrupted)
    seen = Counter(k for batch in interrupted for k in batch)
    assert seen == Counter(k for batch in uninterrupted for k in batch)
    assert interrupted == uninterrupted  # step by step, in the same order
    for epoch in range(STEPS // 5):  # 5 steps an epoch: 60 distinct images of the 64 (4 dropped)
        assert len({k for batch in interrupted[5 * epoch: 5 * epoch + 5] for k in batch}) == 60
    # dropout on: 10 steps × 12 images × 8 features = 960 Bernoulli(0.3) draws, standard deviation 0.015
    assert abs(sum(g["dropped"] for g in whole) / 3 - DROP_RATE) < 0.06
    assert first[0]["losses"] == first[1]["losses"] and resumed[0]["losses"] == resumed[2]["losses"]
    before, after, reference = first[0]["losses"], resumed[0]["losses"], whole[0]["losses"]
    assert sorted(before) == list(range(1, STOP + 1)) and sorted(after) == list(range(STOP + 1, STEPS + 1))
    losses = {**before, **after}
    print("largest loss difference to the uninterrupted run: relative",
          f"{max(abs(loss / reference[step] - 1) for step, loss in losses.items()):.1e}, absolute",
          f"{max(abs(loss - reference[step]) for step, loss in losses.items()):.1e}")
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], rel=LOSS_RTOL, abs=0), step
