"""launch/train.py under each launcher: a 2-node DeepSpeed job on loopback (--no_ssh --node_rank),
mpirun (mpi4py discovery, beside another job on the default port), torchrun; a rank that dies ends the job non-zero instead of hanging."""
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from dist_utils import free_port
from engine_helpers import write_webvision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TIMEOUT_S = 30  # parallel.timeout_s of these jobs
DEEPSPEED_DEFAULT_PORT = 29500  # what DeepSpeed's MPI discovery gives every job


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    write_webvision(str(root / "data"))
    config = root / "tiny.yaml"
    config.write_text(textwrap.dedent(f"""\
        model: {{name: resnet_tiny}}
        data: {{root: {root / 'data'}, image_size: 16, num_workers: 0}}
        train: {{micro_batch_size: 4, max_steps: 2, progress: false}}
        parallel: {{timeout_s: {TIMEOUT_S}}}
        eval: {{batch_size: 8}}
        """))
    return root, str(config)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    env.pop("RANK", None)
    return env


def _check_run(run_dir, result):
    assert result.returncode == 0, result.stdout[-3000:]
    with open(os.path.join(run_dir, "train.csv")) as f:
        rows = f.read().splitlines()
    assert rows[0].startswith("step,epoch,loss,lr,images_per_s,peak_mem_mb") and len(rows) == 3
    assert os.path.exists(os.path.join(run_dir, "eval.json"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run_dir, "tensorboard", "train")))
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == "step-00000002"


@pytest.mark.timeout(300)
def test_two_node_deepspeed_job_on_loopback(job):
    root, config = job
    hostfile = root / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    run_dir, port = str(root / "two_nodes"), str(free_port())
    procs = [subprocess.Popen(
        [f"{BIN}/deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
         "127.0.0.1", "--master_port", port, "launch/train.py", "--config", config, "--set", f"run_dir={run_dir}"],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "dist_world_size=2" in outs[0], outs[0][-3000:]  # one job of two nodes, not two jobs of one
    _check_run(run_dir, subprocess.CompletedProcess([], 0, outs[0]))


@pytest.mark.timeout(300)
def test_mpirun_with_mpi_discovery(job):
    root, config = job
    run_dir = str(root / "mpi")
    env = _env()
    env.pop("MASTER_PORT", None)
    try:  # DeepSpeed's default port in use, as by another job on the node (SO_REUSEADDR: past TIME_WAIT)
        taken = socket.create_server(("", DEEPSPEED_DEFAULT_PORT))
    except OSError:  # someone listens there already: the same situation
        taken = socket.socket()
    with taken:
        result = subprocess.run([f"{BIN}/mpirun", "-n", "2", sys.executable, "launch/train.py", "--config", config,
                                 "--set", f"run_dir={run_dir}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=240)
    _check_run(run_dir, result)
    import torch

    shards = sorted(os.listdir(os.path.join(run_dir, "checkpoints", "step-00000002", "head")))
    assert len(shards) == 2  # two ranks, each with its own classes
    assert [torch.load(os.path.join(run_dir, "checkpoints", "step-00000002", "head", s))["class_start"]
            for s in shards] == [0, 2]


DYING = """
import os, sys
sys.path.insert(0, {launch!r})
from megaclass.engine import trainer

step = trainer.Trainer.train_step
def train_step(self, batches):
    if self.rank == 1 and self.step == 1:
        os._exit(7)  # a crash with no clean-up, like a killed process
    return step(self, batches)
trainer.Trainer.train_step = train_step
import train
sys.exit(train.main())
"""


@pytest.mark.timeout(300)
def test_a_dying_rank_ends_a_torchrun_job_nonzero_within_the_timeout(job):
    root, config = job
    script = root / "dying.py"
    script.write_text(DYING.format(launch=os.path.join(REPO, "launch")))
    result = subprocess.run([f"{BIN}/torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
                             "--config", config, "--set", f"run_dir={root / 'dying'}"], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S + 150)
    assert result.returncode != 0
    assert "exitcode  : 7" in result.stdout, result.stdout[-3000:]  # torchrun names the rank that died first
