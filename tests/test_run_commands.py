"""`megaclass train | predict`, `megaclass weights` on what predict wrote, from outside the source tree:
training under the real `deepspeed` launcher (2 CPU ranks, `--module megaclass.train`), prediction from
its checkpoint on one rank, checked against the checkpoint's own tensors evaluated in float64."""
import glob
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)  # as an installed package: no launch/ on the path
    env.pop("RANK", None)
    return env


def _run(args, cwd, timeout=400):
    """Run a command in its own session; on a timeout, end every process it started (the launcher's ranks too)."""
    proc = subprocess.Popen(args, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{args[:4]} ran past {timeout} s:\n{out[-3000:]}") from None
    return subprocess.CompletedProcess(args, proc.returncode, out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic data (`megaclass synth`), then 2 steps of a tiny model on 2 deepspeed ranks."""
    root = tmp_path_factory.mktemp("commands")
    data, run_dir = root / "data", root / "run"
    made = _run([sys.executable, "-m", "megaclass.cli", "synth", "--out", str(data), "--classes", "6",
                 "--per-class", "10", "--val-per-class", "2", "--image-size", "16"], cwd=root)
    assert made.returncode == 0, made.stdout[-3000:]
    config = root / "tiny.yaml"
    config.write_text(textwrap.dedent(f"""\
        run_dir: {run_dir}
        model: {{name: resnet_tiny}}
        data: {{root: {data}, image_size: 16, num_workers: 0}}
        train: {{micro_batch_size: 4, max_steps: 2, progress: false}}
        parallel: {{timeout_s: 300}}  # only bounds how long a failure takes to show; the machine may be loaded
        eval: {{batch_size: 8}}
        """))
    from dist_utils import free_port

    port = free_port()
    trained = _run([f"{BIN}/deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module",
                    "megaclass.train", "--config", str(config)], cwd=root)
    trained.port = port
    return root, data, run_dir, config, trained


@pytest.mark.timeout(900)
def test_megaclass_train_runs_as_a_module_under_the_deepspeed_launcher(trained):
    _, _, run_dir, _, result = trained
    assert result.returncode == 0, result.stdout[-3000:]
    assert "dist_world_size=2" in result.stdout, result.stdout[-3000:]
    assert "validation: top-1" in result.stdout
    assert open(run_dir / "checkpoints" / "latest").read() == "step-00000002"
    assert len(os.listdir(run_dir / "checkpoints" / "step-00000002" / "head")) == 2  # one shard per rank
    assert len((run_dir / "train.csv").read_text().splitlines()) == 3
    # DeepSpeed's CPU shared-memory allreduce never unlinks its 67 MB buffer per rank; each rank unlinks
    # its own once every rank has mapped them all (engine.distributed.init), so none outlives the job
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{result.port}_*")


def _reference_topk(data, checkpoint, k):
    """Top-k softmax of the checkpoint's backbone and head rows, evaluated in float64."""
    from megaclass.data import ImageDataset, load_webvision
    from megaclass.models import build_backbone

    backbone = build_backbone("resnet_tiny", seed=0)
    backbone.load_state_dict(torch.load(checkpoint / "ds" / "mp_rank_00_model_states.pt",
                                        weights_only=False)["module"])
    shards = [torch.load(checkpoint / "head" / name, weights_only=True)
              for name in sorted(os.listdir(checkpoint / "head"))]
    weight = torch.cat([s["params"]["weight"] for s in shards]).double()
    bias = torch.cat([s["params"]["bias"] for s in shards]).double() if "bias" in shards[0]["params"] else 0.0
    wv = load_webvision(data)
    images = ImageDataset(data, wv.train_items(), 16, train=False)
    x = torch.stack([images[i][0] for i in range(len(images))]).double()
    with torch.no_grad():
        probs = torch.softmax(backbone.double().eval()(x) @ weight.T + bias, dim=1)
    p, c = probs.topk(k, dim=1)
    return [path for path, _ in wv.train_items()], [[wv.wnids[j] for j in row] for row in c.tolist()], p


@pytest.mark.timeout(900)
def test_megaclass_predict_writes_the_predictions_that_megaclass_weights_reads(trained):
    root, data, run_dir, config, result = trained
    assert result.returncode == 0, result.stdout[-3000:]
    pred = root / "PRED.tsv"
    # one rank reads the checkpoint two ranks wrote (ZeRO 0: its head shards re-shard)
    out = _run([sys.executable, "-m", "megaclass.cli", "predict", "--config", str(config), "--checkpoint", str(run_dir),
                "--data", str(data), "--out", str(pred), "--topk", "3"], cwd=root)
    assert out.returncode == 0, out.stdout[-3000:]
    paths, wnids, probs = _reference_topk(data, run_dir / "checkpoints" / "step-00000002", k=3)
    rows = [line.split("\t") for line in pred.read_text().splitlines()]
    assert [r[0] for r in rows] == paths
    for (_, items), ref_wnids, ref_probs in zip(rows, wnids, probs):
        got = [item.split(":") for item in items.split()]
        assert [w for w, _ in got] == ref_wnids
        # fp32 forward against float64, then 6 decimals: 1e-5 is far below any gap between classes here
        assert torch.allclose(torch.tensor([float(p) for _, p in got], dtype=torch.float64), ref_probs, atol=1e-5)

    wv_wnids = [line.split()[0] for line in (data / "info" / "synsets.txt").read_text().splitlines() if line.strip()]
    knn = root / "knn.tsv"
    knn.write_text("".join(f"{w}\t{wv_wnids[(i + 1) % len(wv_wnids)]}\t0.5\n" for i, w in enumerate(wv_wnids)))
    weights = root / "weights.tsv"
    made = _run([sys.executable, "-m", "megaclass.cli", "weights", "--data", str(data), "--knn", str(knn),
                 "--predictions", str(pred), "--stage", "1", "--out", str(weights), "--no-plot"], cwd=root)
    assert made.returncode == 0, made.stdout[-3000:]
    assert [line.split("\t")[0] for line in weights.read_text().splitlines()] == paths


@pytest.mark.timeout(900)
def test_megaclass_predict_refuses_the_same_classes_in_another_order(trained, tmp_path):
    """Before the checkpoint knew its classes, this exited 0 and silently relabelled every prediction."""
    import json
    import shutil

    root, data, run_dir, config, result = trained
    assert result.returncode == 0, result.stdout[-3000:]
    synsets = (data / "info" / "synsets.txt").read_text().splitlines()
    meta = json.loads((run_dir / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert meta["classes"] == [line.split()[0] for line in synsets]
    other = tmp_path / "data"
    shutil.copytree(data, other)
    (other / "info" / "synsets.txt").write_text("\n".join([synsets[1], synsets[0], *synsets[2:]]) + "\n")
    pred = tmp_path / "PRED.tsv"
    out = _run([sys.executable, "-m", "megaclass.cli", "predict", "--config", str(config), "--checkpoint", str(run_dir),
                "--data", str(other), "--out", str(pred)], cwd=root)
    assert out.returncode == 2, out.stdout[-3000:]
    first, second = synsets[0].split()[0], synsets[1].split()[0]
    assert f"first at class index 0: the checkpoint has {first}, this run {second}" in out.stdout
    assert "Traceback" not in out.stdout and not pred.exists()


def test_megaclass_predict_names_a_checkpoint_it_cannot_find(tmp_path, capsys):
    from megaclass.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("model: {name: resnet_tiny}\n")
    assert main(["predict", "--config", str(config), "--checkpoint", str(tmp_path), "--out", str(tmp_path / "p.tsv")]) == 2
    assert f"--checkpoint {tmp_path}: neither a checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "experiment", "predict"])
def test_run_commands_name_a_bad_config_key_before_joining_a_group(tmp_path, capsys, command):
    """The console script and the `python -m megaclass.<command>` module read the same flags and stop
    on a bad config with the key named, before any process group exists."""
    import importlib

    from megaclass.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("model: {name: resnet_tiny}\ntrain: {epochs: -1}\n")
    extra = ["--checkpoint", str(tmp_path), "--out", str(tmp_path / "p.tsv")] if command == "predict" else []
    if command == "predict":
        (tmp_path / "meta.json").write_text("{}")  # a checkpoint folder, so the config is what fails
    assert main([command, "--config", str(config), *extra]) == 2
    assert "train.epochs" in capsys.readouterr().err
    module = importlib.import_module(f"megaclass.{command}")
    assert module.main(["--local_rank=0", "--config", str(config), *extra]) == 2  # as `deepspeed --module` calls it
    assert "train.epochs" in capsys.readouterr().err
