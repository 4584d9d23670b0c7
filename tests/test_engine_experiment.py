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


# -- the experiment end to end on a tiny synthetic data set ---------------------------------------------

def _experiment_config(root, run_dir, shards=None, **experiment):
    from megaclass.engine.config import config_from_dict

    source = {"shards": str(shards)} if shards else {"root": str(root)}
    return config_from_dict({
        "run_dir": str(run_dir), "model": {"name": "resnet_tiny"},
        "data": {**source, "image_size": 16, "num_workers": 0},
        "optim": {"name": "sgd", "lr": 0.1, "warmup_steps": 2},
        "train": {"epochs": 1, "micro_batch_size": 16, "seed": 0, "resume": False, "progress": False},
        "eval": {"batch_size": 64, "every_epochs": 1},
        "experiment": {"knn_k": 2, **experiment},
    })


def _experiment_twice(rank, world, with_val, without_val):
    """The experiment on the data with its validation list and on a copy without it (one process)."""
    import os

    from megaclass.engine.data import load_run_data
    from megaclass.engine.experiment import run

    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed's engine asks for it (a launcher sets it)
    out = []
    for root, run_dir in (with_val, without_val):
        cfg = _experiment_config(root, run_dir)
        out.append(run(cfg, load_run_data(cfg)))
    return out


@pytest.mark.timeout(300)
def test_the_weights_do_not_depend_on_the_validation_set(tmp_path):
    """Issue 13 (B): nothing is chosen on validation data. The experiment (default config) run with the validation filelist present and removed writes the same weight files,
    byte for byte; only the run with validation images reports accuracies."""
    import shutil

    from megaclass.data.synth import SynthConfig, generate

    root = tmp_path / "data"
    generate(root, SynthConfig(classes=6, per_class=24, val_per_class=2, image_size=16, seed=3), progress=False)
    bare = tmp_path / "data-without-val"
    shutil.copytree(root, bare)
    (bare / "info" / "val_filelist.txt").unlink()
    with_val, without_val = run_ranks(_experiment_twice, 1, (str(root), str(tmp_path / "a")),
                                      (str(bare), str(tmp_path / "b")), timeout=280)[0]
    for name in ("weights_stage1.tsv", "weights_stage2.tsv"):
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert a == b and len(a.splitlines()) == sum(1 for _ in open(root / "info" / "train_filelist_google.txt")) + \
            sum(1 for _ in open(root / "info" / "train_filelist_flickr.txt"))
    assert all("top1" in with_val[key] for key in ("baseline", "stage1", "stage2"))
    assert not any("top1" in without_val[key] for key in ("baseline", "stage1", "stage2"))


def test_crossfit_folds_are_disjoint_cover_every_image_and_follow_the_seed():
    import torch

    from megaclass.engine.experiment import crossfit_folds

    labels = torch.randint(7, (203,), generator=torch.Generator().manual_seed(1))
    for folds in (2, 3, 5):
        fold = crossfit_folds(labels, folds, seed=4)
        assert fold.shape == labels.shape and set(fold.tolist()) == set(range(folds))  # one fold per image: disjoint, covering
        assert torch.equal(fold, crossfit_folds(labels, folds, seed=4))
        sizes = torch.bincount(fold, minlength=folds)
        assert int(sizes.max() - sizes.min()) <= 1
        for c in range(7):  # stratified: each class spread over the folds to within one image
            per_fold = torch.bincount(fold[labels == c], minlength=folds)
            assert int(per_fold.max() - per_fold.min()) <= 1
    assert not torch.equal(crossfit_folds(labels, 2, seed=4), crossfit_folds(labels, 2, seed=5))


class _Items:
    """(image, label, index served) with an unreadable item that serves the next one, as ImageDataset does."""

    def __init__(self, n, unreadable=()):
        self.n, self.unreadable = n, set(unreadable)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        while i in self.unreadable:
            i = (i + 1) % self.n
        return f"image{i}", i % 3, i


def test_a_subset_numbers_its_items_and_skips_an_unreadable_one_within_itself():
    import torch

    from megaclass.engine.data import Subset

    subset = Subset(_Items(10, unreadable={4}), torch.tensor([7, 4, 2]))
    assert len(subset) == 3
    assert subset[0] == ("image7", 1, 0)
    assert subset[1] == ("image2", 2, 2)  # 4 is unreadable; the dataset's stand-in (5) is outside: the next of the subset
    assert subset[2] == ("image2", 2, 2)


class _FoldTrainer:
    """Stands in for the trainer class in `crossfit_predictions`: records what each fold model was
    given and 'predicts' every item as its own index (so the result shows which item each row got)."""

    made = []

    def __init__(self, cfg, data, name):
        self.data, self.name, self.run_dir = data, name, cfg.run_dir
        self.step, self.data_world = 2, 1  # two optimizer steps on one rank
        _FoldTrainer.made.append(self)

    def fit(self, val=None):
        self.val = val
        return []

    def predict(self, dataset, k, desc=""):
        import torch

        served = torch.tensor([dataset[j][2] for j in range(len(dataset))])
        rows = torch.tensor([dataset.indices[j] for j in served.tolist()])
        self.predicted = rows
        return torch.full((len(dataset), k), 0.5), rows[:, None].repeat(1, k)

    def close(self):
        pass


def test_every_training_image_gets_exactly_one_held_out_prediction(monkeypatch, tmp_path):
    """`crossfit_predictions`: each fold model trains on the other folds' images (with their labels
    and weights) and predicts its own fold; together they predict every image once."""
    import torch

    from megaclass.engine import experiment
    from megaclass.engine.config import config_from_dict

    n, classes = 41, 4
    labels = torch.arange(n) % classes
    weights = torch.rand(n, generator=torch.Generator().manual_seed(0))
    data = type("Data", (), {})()
    data.train, data.train_eval, data.labels = _Items(n), _Items(n), labels
    data.num_classes, data.wnids = classes, [f"n{c:08d}" for c in range(classes)]  # as RunData has them
    monkeypatch.setattr(experiment, "trainer_class", lambda cfg: _FoldTrainer)
    _FoldTrainer.made = []
    cfg = config_from_dict({"run_dir": str(tmp_path), "experiment": {"folds": 3}})
    probs, predicted, steps = experiment.crossfit_predictions(cfg, data, weights, "stage1")
    assert steps == 3 * 2 * cfg.train.micro_batch_size * cfg.train.grad_accum  # 3 folds' trainings
    assert torch.equal(predicted[:, 0], torch.arange(n))  # each row predicted, and by the row's own item
    fold = experiment.crossfit_folds(labels, 3, cfg.train.seed)
    assert [t.name for t in _FoldTrainer.made] == ["stage1_fold0", "stage1_fold1", "stage1_fold2"]
    for f, trainer in enumerate(_FoldTrainer.made):
        held = set(trainer.predicted.tolist())
        trained = set(trainer.data.dataset.indices)
        assert held == set((fold == f).nonzero().squeeze(1).tolist()) and not held & trained
        assert held | trained == set(range(n)) and trainer.val is None  # fold models never see validation
        idx = torch.tensor(trainer.data.dataset.indices)
        assert torch.equal(trainer.data.labels, labels[idx]) and torch.equal(trainer.data.sample_weights, weights[idx])
        assert trainer.run_dir == str(tmp_path / "stage1" / f"fold{f}")


def test_the_experiment_config_checks_its_keys():
    from megaclass.engine.config import ConfigError, config_from_dict

    cfg = config_from_dict({})
    assert (cfg.experiment.predictions, cfg.experiment.folds, cfg.experiment.oracle) == ("final", 2, False)
    with pytest.raises(ConfigError, match="experiment.predictions: must be one of crossfit, final, got 'last'"):
        config_from_dict({"experiment": {"predictions": "last"}})
    with pytest.raises(ConfigError, match="experiment.folds: must be at least 2"):
        config_from_dict({"experiment": {"folds": 1}})
    with pytest.raises(ConfigError, match="experiment.oracle: expected true/false"):
        config_from_dict({"experiment": {"oracle": "yes"}})
    assert (cfg.experiment.mode, cfg.experiment.warmup_epochs) == ("staged", 1)
    with pytest.raises(ConfigError, match="experiment.mode: must be one of staged, online, online_loss, got 'both'"):
        config_from_dict({"experiment": {"mode": "both"}})
    with pytest.raises(ConfigError, match="experiment.warmup_epochs: must be >= 0"):
        config_from_dict({"experiment": {"warmup_epochs": -1}})
    assert (cfg.experiment.online_epochs, cfg.experiment.online_em, cfg.experiment.online_text) == (None, "step", True)
    with pytest.raises(ConfigError, match="experiment.online_em: must be one of step, converge, got 'all'"):
        config_from_dict({"experiment": {"online_em": "all"}})
    with pytest.raises(ConfigError, match="experiment.online_epochs: must be positive or null, got 0"):
        config_from_dict({"experiment": {"online_epochs": 0}})
    with pytest.raises(ConfigError, match="experiment.mode: online scores each training batch"):
        config_from_dict({"experiment": {"mode": "online"}, "parallel": {"pipeline_stages": 2}})


def test_the_oracle_needs_the_truth_file(tmp_path):
    import torch

    from megaclass.engine.config import ConfigError, config_from_dict
    from megaclass.engine.experiment import oracle_weights

    on_shards = config_from_dict({"data": {"shards": str(tmp_path)}, "experiment": {"oracle": True}})
    with pytest.raises(ConfigError, match=r"experiment.oracle: needs data.root/truth_train.tsv .* on shards, set data.root"):
        oracle_weights(on_shards, ["google/q0001/a.jpg"])
    cfg = config_from_dict({"data": {"root": str(tmp_path)}, "experiment": {"oracle": True}})
    with pytest.raises(ConfigError, match=r"experiment.oracle: needs .*truth_train.tsv"):
        oracle_weights(cfg, ["google/q0001/a.jpg"])
    (tmp_path / "truth_train.tsv").write_text("# path\tclean\ttrue_wnid\tkind\n"
                                              "google/q0001/a.jpg\t1\tn1\tclean\ngoogle/q0001/b.jpg\t0\tn2\toutlier\n")
    assert torch.equal(oracle_weights(cfg, ["google/q0001/b.jpg", "google/q0001/a.jpg"]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="no row for 1 training images, e.g. 'google/q0001/c.jpg'"):
        oracle_weights(cfg, ["google/q0001/a.jpg", "google/q0001/c.jpg"])


@pytest.mark.timeout(300)
def test_the_experiment_command_refuses_an_oracle_without_truth_as_a_clean_error(tmp_path):
    import os
    import subprocess
    import sys

    from engine_helpers import write_webvision

    write_webvision(str(tmp_path / "data"))  # no truth_train.tsv: not synthetic data
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {{root: {tmp_path / 'data'}, image_size: 16, num_workers: 0}}\n"
                      f"run_dir: {tmp_path / 'run'}\nexperiment: {{oracle: true}}\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "megaclass.experiment", "--config", str(config)], cwd=repo,
                            env=dict(os.environ, PYTHONPATH=repo), capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "experiment.oracle: needs" in result.stderr and "truth_train.tsv" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "baseline").exists()  # refused before any training


def test_the_table_gives_the_share_of_the_oracle_gap_closed():
    from megaclass.engine.experiment import table

    results = {"baseline": {"top1": 70.0, "top5": 90.0, "image_steps": 1000, "total_seconds": 10.0},
               "stage1": {"top1": 74.0, "top5": 91.0, "image_steps": 2100, "total_seconds": 21.0, "weights_auc": 0.8},
               "stage2": {"top1": 76.0, "top5": 92.0, "image_steps": 3200, "total_seconds": 32.4, "weights_auc": 0.9},
               "online": {"top1": 75.0, "top5": 91.5, "image_steps": 1000, "total_seconds": 11.0, "weights_auc": 0.85},
               "oracle": {"top1": 80.0, "top5": 95.0, "image_steps": 1000, "total_seconds": 10.0}}
    lines = table(results).splitlines()
    assert lines[0] == "| Method | Top-1 (%) | Top-5 (%) | weights AUC | image-steps | wall (s) | oracle gap closed |"
    assert lines[2] == "| Baseline | 70.00 | 90.00 | | 1,000 | 10 | |"
    assert lines[3] == "| +Stage1 | 74.00 | 91.00 | 0.800 | 2,100 | 21 | 40% |"
    assert lines[4] == "| +Stage1+Stage2 | 76.00 | 92.00 | 0.900 | 3,200 | 32 | 60% |"
    assert lines[5] == "| Online (one training) | 75.00 | 91.50 | 0.850 | 1,000 | 11 | 50% |"
    assert lines[6] == "| Clean-only oracle | 80.00 | 95.00 | | 1,000 | 10 | |"
    del results["oracle"]
    for row in results.values():
        row.pop("weights_auc", None)
    assert table(results).splitlines()[0] == "| Method | Top-1 (%) | Top-5 (%) | image-steps | wall (s) |"


def _experiment_on_shards(rank, world, shards, run_dir):
    import os

    from megaclass.engine.data import load_run_data
    from megaclass.engine.experiment import run

    os.environ["LOCAL_RANK"] = str(rank)
    cfg = _experiment_config(None, run_dir, shards=shards)
    return run(cfg, load_run_data(cfg))


@pytest.mark.timeout(300)
def test_the_experiment_runs_on_shards_with_the_side_information_of_their_json(tmp_path):
    """On shards alone (no data.root), the experiment trains, predicts and weighs every training image;
    its stage-1 weights are those the file path's metadata gives for the same predictions."""
    from megaclass.data import load_webvision
    from megaclass.data.shards import convert
    from megaclass.data.synth import SynthConfig, generate
    from megaclass.weighting.pipeline import compute_weights, save_weights

    root = tmp_path / "data"
    generate(root, SynthConfig(classes=6, per_class=24, val_per_class=2, image_size=16, seed=3), progress=False)
    convert(root, tmp_path / "shards", per_shard=40, progress=False)
    results = run_ranks(_experiment_on_shards, 1, str(tmp_path / "shards"), str(tmp_path / "run"), timeout=280)[0]
    assert all("top1" in results[key] for key in ("baseline", "stage1", "stage2"))
    files = load_webvision(root)
    for name in ("weights_stage1.tsv", "weights_stage2.tsv"):
        rows = (tmp_path / "run" / name).read_text().splitlines()
        assert sorted(r.split("\t")[0] for r in rows if not r.startswith("#")) == sorted(files.train.paths)
    # the same predictions weighed with the side information read from data.root's files
    result = compute_weights(root, tmp_path / "run/semantics/knn.tsv", tmp_path / "run/baseline/predictions_train.tsv", 1)
    save_weights(result, root, tmp_path / "from_files.tsv", plot=False)
    assert (tmp_path / "from_files.tsv").read_bytes() == (tmp_path / "run/weights_stage1.tsv").read_bytes()


def test_rows_of_another_mode_are_kept_only_from_the_same_config(tmp_path):
    """`make demo` runs staged, then online, into one run_dir: one table; a run with another config
    (here another seed) does not inherit the rows."""
    import json

    from megaclass.engine.config import config_from_dict
    from megaclass.engine.experiment import _fingerprint, _rows_kept

    staged = config_from_dict({"run_dir": str(tmp_path), "experiment": {"mode": "staged", "oracle": True}})
    online = config_from_dict({"run_dir": str(tmp_path), "experiment": {"mode": "online"}})
    rows = {"baseline": {"top1": 70.0}, "stage1": {"top1": 74.0}, "stage2": {"top1": 76.0}, "oracle": {"top1": 80.0},
            "online": {"top1": 75.0}}
    (tmp_path / "results.json").write_text(json.dumps({**rows, "config": _fingerprint(staged)}))
    assert _rows_kept(str(tmp_path), online) == {key: rows[key] for key in ("baseline", "stage1", "stage2", "oracle")}
    assert _rows_kept(str(tmp_path), staged) == {"online": rows["online"]}
    other_seed = config_from_dict({"run_dir": str(tmp_path), "train": {"seed": 1}, "experiment": {"mode": "online"}})
    assert _rows_kept(str(tmp_path), other_seed) == {}
    # the online modes' own settings do not make the staged rows another experiment's
    longer = config_from_dict({"run_dir": str(tmp_path), "experiment": {"mode": "online", "online_epochs": 10,
                                                                          "online_em": "converge"}})
    assert _rows_kept(str(tmp_path), longer) == _rows_kept(str(tmp_path), online)
    (tmp_path / "results.json").write_text("{not json")
    assert _rows_kept(str(tmp_path), online) == {}
