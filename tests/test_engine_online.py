"""experiment.mode online: the views of the forward passes, sharded by rank and gathered, equal sums
over the batches by hand; a run resumed mid-way re-estimates what an unbroken one does; nothing
depends on the validation set."""
import numpy as np
import pytest
from dist_utils import run_ranks


def _batches(n, k, classes, rng, count):
    """`count` scored global batches of 8 rows: (index, labels, top-k probs, top-k classes, log p(label))."""
    out = []
    for _ in range(count):
        index = rng.choice(n, 8, replace=False)
        index[0] = -1  # a padded row (an unreadable image)
        labels = rng.integers(0, classes, 8)
        classes_k = np.stack([rng.choice(classes, k, replace=False) for _ in range(8)])
        probs = np.sort(rng.dirichlet(np.ones(k), 8), axis=1)[:, ::-1].copy()
        log_p = np.log(rng.uniform(0.01, 1.0, 8))
        out.append((index, labels, probs, classes_k, log_p))
    return out


def test_views_are_moving_averages_of_epoch_means_and_move_to_another_world_size():
    from megaclass.engine.online import MOMENTUM, ImageViews

    n, k, classes = 23, 3, 6
    rng = np.random.default_rng(0)
    neighbors = np.array([[1, 2], [0, 2], [3, -1], [2, 4], [5, 3], [4, 0]])
    epochs = [_batches(n, k, classes, rng, 6), _batches(n, k, classes, rng, 6)]
    # by hand, in float64: per epoch and image, the mean p, mean −log p and each cell's share (0 on the
    # label, 1/2 on a neighbour with the label in / out of the top k, 3/4 elsewhere); then the averages
    p_avg, loss_avg, cell_avg = np.full(n, np.nan), np.full(n, np.nan), np.zeros((n, 5))
    latest = np.full((n, k), -1)
    for batches in epochs:
        visits, p_sum, loss_sum, cells = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros((n, 5))
        for index, labels, probs, top, log_p in batches:
            for i, y, c, lp in zip(index, labels, top, log_p):
                if i < 0:
                    continue
                visits[i] += 1
                p_sum[i] += np.exp(lp)
                loss_sum[i] -= lp
                in_top = y in c
                cell = 0 if c[0] == y else (1 if in_top else 2) if c[0] in neighbors[y] else (3 if in_top else 4)
                cells[i, cell] += 1
                latest[i] = c
        for i in np.flatnonzero(visits):
            means = p_sum[i] / visits[i], loss_sum[i] / visits[i], cells[i] / visits[i]
            if np.isnan(p_avg[i]):
                p_avg[i], loss_avg[i], cell_avg[i] = means
            else:
                p_avg[i] = MOMENTUM * p_avg[i] + (1 - MOMENTUM) * means[0]
                loss_avg[i] = MOMENTUM * loss_avg[i] + (1 - MOMENTUM) * means[1]
                cell_avg[i] = MOMENTUM * cell_avg[i] + (1 - MOMENTUM) * means[2]
    # epoch 1 recorded on 2 ranks; epoch 2 half on those, half after a resume on 3 ranks
    views = [ImageViews(n, r, 2, k) for r in range(2)]
    for batch in epochs[0]:
        for v in views:
            v.record(*batch, neighbors)
    for v in views:
        v.fold()
    for batch in epochs[1][:3]:
        for v in views:
            v.record(*batch, neighbors)
    moved = [ImageViews(n, r, 3, k) for r in range(3)]
    for v in moved:
        v.load([w.state() for w in views])
    for batch in epochs[1][3:]:
        for v in moved:
            v.record(*batch, neighbors)
    for v in moved:
        v.fold()
    whole = ImageViews(n, 0, 1, k)  # one process: rank 0 of 1 gathers
    whole.load([v.state() for v in moved])
    assert sum(len(v.index) for v in moved) == n and whole.bytes_per_image == 2 + 4 + 4 + 2 * 5 + 4 + 4 + 2 * 5 + 4 * k
    got = whole.gather()
    seen = ~np.isnan(p_avg)
    np.testing.assert_array_equal(got["seen"], seen)
    np.testing.assert_allclose(got["p_label"][seen], p_avg[seen], rtol=1e-5)
    np.testing.assert_allclose(got["loss"][seen], loss_avg[seen], rtol=1e-5)
    assert np.isnan(got["loss"][~seen]).all() and (got["cell"][~seen] == -1).all()
    np.testing.assert_allclose(whole.cells[seen], cell_avg[seen], atol=2e-3)  # float16
    clear = np.sort(cell_avg, 1)[:, -1] - np.sort(cell_avg, 1)[:, -2] > 5e-3  # no near-tie of cells
    np.testing.assert_array_equal(got["cell"][seen & clear], cell_avg.argmax(1)[seen & clear])
    np.testing.assert_array_equal(got["top_k"], latest)


def _config(root, run_dir, **train):
    from megaclass.engine.config import config_from_dict

    return config_from_dict({
        "run_dir": str(run_dir), "model": {"name": "resnet_tiny"},
        "data": {"root": str(root), "image_size": 16, "num_workers": 0},
        "optim": {"name": "sgd", "lr": 0.1, "warmup_steps": 2},
        "train": {"epochs": 3, "micro_batch_size": 8, "seed": 0, "progress": False, "save_every": 4, **train},
        "eval": {"batch_size": 64, "every_epochs": 0},
        "experiment": {"knn_k": 2, "mode": "online"},
    })


def _online_runs(rank, world, root, runs):
    """Each (run_dir, train overrides) in turn: the online experiment on `root` (every rank)."""
    import os

    from megaclass.engine.data import load_run_data
    from megaclass.engine.experiment import run

    os.environ["LOCAL_RANK"] = str(rank)
    out = []
    for run_dir, data_root, train in runs:
        cfg = _config(data_root or root, run_dir, **train)
        out.append(run(cfg, load_run_data(cfg))["online"])
    return out


@pytest.mark.timeout(660)
def test_an_online_run_resumed_midway_reestimates_what_an_unbroken_run_does(tmp_path):
    """2 ranks; 104 images, global batch 16: 6 steps an epoch, 18 in all. The broken run stops at step 10
    (inside epoch 2, the first that collects views; its checkpoint at step 8) and is resumed."""
    from megaclass.data.synth import SynthConfig, generate

    root = tmp_path / "data"
    generate(root, SynthConfig(classes=6, per_class=16, val_per_class=2, image_size=16, seed=3), progress=False)
    unbroken, a = str(tmp_path / "unbroken"), str(tmp_path / "broken")
    results = run_ranks(_online_runs, 2, str(root), [(unbroken, None, {"resume": False}),
                                                      (a, None, {"resume": False, "max_steps": 10}),
                                                      (a, None, {"resume": True})], timeout=600)
    full, first, resumed = results[0]
    assert first["image_steps"] == 10 * 16 and resumed["image_steps"] == 18 * 16
    # re-estimates after epochs 2 (views of epoch 2, half of them from before the break) and the start
    assert [e["epoch"] for e in full["estimates"]] == [0, 2] and [e["epoch"] for e in resumed["estimates"]] == [0, 2]
    assert resumed["estimates"][-1] == full["estimates"][-1]
    assert (tmp_path / "broken" / "weights_online.tsv").read_bytes() == \
        (tmp_path / "unbroken" / "weights_online.tsv").read_bytes()


@pytest.mark.timeout(600)
def test_the_online_weights_do_not_depend_on_the_validation_set(tmp_path):
    import shutil

    from megaclass.data.synth import SynthConfig, generate

    root = tmp_path / "data"
    generate(root, SynthConfig(classes=6, per_class=16, val_per_class=2, image_size=16, seed=4), progress=False)
    bare = tmp_path / "data-without-val"
    shutil.copytree(root, bare)
    (bare / "info" / "val_filelist.txt").unlink()
    with_val, without_val = run_ranks(_online_runs, 1, str(root), [(str(tmp_path / "a"), None, {"resume": False}),
                                                                  (str(tmp_path / "b"), str(bare), {"resume": False})],
                                      timeout=540)[0]
    assert "top1" in with_val and "top1" not in without_val
    a, b = (tmp_path / "a" / "weights_online.tsv").read_bytes(), (tmp_path / "b" / "weights_online.tsv").read_bytes()
    assert a == b and len(a.splitlines()) > 80
    assert with_val["estimates"] == without_val["estimates"]


def test_without_the_page_text_the_weights_come_from_the_rank_and_the_predictions_alone(tmp_path):
    """experiment.online_text: false (stage 1's evidence only, to measure what the text adds): the start
    weights are EM on the rank alone, as `online_weights` gives them when no page says anything."""
    import dataclasses

    from megaclass.data.columns import as_string_column, lookup
    from megaclass.data.synth import SynthConfig, generate
    from megaclass.engine.data import load_run_data
    from megaclass.engine.experiment import OnlineEstimate, side_information
    from megaclass.weighting.online import online_weights

    root = tmp_path / "data"
    generate(root, SynthConfig(classes=6, per_class=16, val_per_class=2, image_size=16, seed=5), progress=False)
    cfg = _config(root, tmp_path / "run")
    data = load_run_data(cfg)
    info = side_information(cfg, data)
    neighbors = np.tile(np.arange(2), (data.num_classes, 1))
    row = lookup(info.train.paths, as_string_column(data.paths))
    rank_alone = online_weights(np.asarray(info.train.sources)[row], np.asarray(info.train.ranks)[row],
                                np.full(len(row), np.nan))
    no_text = dataclasses.replace(cfg, experiment=dataclasses.replace(cfg.experiment, online_text=False))
    np.testing.assert_array_equal(OnlineEstimate(no_text, data, info, neighbors)(None, 0), rank_alone)
    with_text = OnlineEstimate(cfg, data, info, neighbors)(None, 0)
    assert np.abs(with_text - rank_alone).max() > 0.05  # the text moves the start
