"""Faults injected into real 2-rank jobs (gloo, CPU), each compared with a clean run's end state exactly:
a preemption signal to either rank (save, exit 75, exact resume), a killed or stopped "node" of a
2-node job noticed by the heartbeat (exit 76 naming the rank and host), and runs under the restart
launch (launch/restart.sh: torchrun --max-restarts) that lose a rank to SIGKILL, SIGTERM or SIGSTOP at
a random step and still end with the clean run's parameters, bit for bit."""
import csv
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from dist_utils import free_port
from engine_helpers import write_webvision

from megaclass.engine.faults import LOST_RANK_EXIT, REQUEUE_EXIT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
INJECT = os.path.join(REPO, "tests", "fault_inject.py")  # launch/train.py plus MEGACLASS_TEST_FAULT
STEPS, SAVE_EVERY = 6, 2
TIMEOUT_S = 900  # parallel.timeout_s: a job that waited for it would outlast every test's limit
HEARTBEAT_S = 6
JOB_LIMIT_S = 400  # one launch under a loaded 2-core machine; far below TIMEOUT_S


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_webvision(str(root / "data"))
    config = root / "tiny.yaml"
    config.write_text(textwrap.dedent(f"""\
        model: {{name: resnet_tiny}}
        data: {{root: {root / 'data'}, image_size: 16, num_workers: 0}}
        train: {{micro_batch_size: 4, max_steps: {STEPS}, save_every: {SAVE_EVERY}, progress: false}}
        parallel: {{timeout_s: {TIMEOUT_S}, heartbeat_s: {HEARTBEAT_S}}}
        """))
    clean = str(root / "clean")
    result = _deepspeed(config, clean)
    assert result.returncode == 0, result.stdout[-3000:]
    return root, str(config), clean


def _env(fault=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, PATH=f"{BIN}:{os.environ['PATH']}")
    env.pop("RANK", None)
    env.pop("MEGACLASS_TEST_FAULT", None)
    if fault:
        env["MEGACLASS_TEST_FAULT"] = fault
    return env


def _deepspeed(config, run_dir, fault=None, script=INJECT):
    return subprocess.run([f"{BIN}/deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), script,
                           "--config", str(config), "--set", f"run_dir={run_dir}", "--no-eval"],
                          cwd=REPO, env=_env(fault), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=JOB_LIMIT_S)


def _restart_launch(config, run_dir, fault):
    env = dict(_env(fault), TRAIN_SCRIPT=INJECT, MAX_RESTARTS="2", SHUTDOWN_TIMEOUT_S="3")
    return subprocess.run(["launch/restart.sh", "2", config, "--set", f"run_dir={run_dir}", "--no-eval"], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=2 * JOB_LIMIT_S)


def _losses(run_dir):
    with open(os.path.join(run_dir, "train.csv")) as f:
        return {int(r["step"]): r["loss"] for r in csv.DictReader(f)}  # as written: exact text


def _tensors(obj, prefix=""):
    """Every tensor in a loaded checkpoint file, by its path in the nested structure."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for key, value in items:
        out.update(_tensors(value, f"{prefix}/{key}"))
    return out


def _final_state(run_dir):
    """Every tensor of the final checkpoint (head shards, DeepSpeed's model and optimizer states)."""
    folder = os.path.join(run_dir, "checkpoints", f"step-{STEPS:08d}")
    state = {}
    for dirpath, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(".pt"):
                path = os.path.join(dirpath, name)
                loaded = torch.load(path, map_location="cpu", weights_only=False)
                state.update(_tensors(loaded, os.path.relpath(path, folder)))
    assert state, f"no tensors under {folder}"
    return state


def _assert_same_state(run_dir, clean):
    got, want = _final_state(run_dir), _final_state(clean)
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.slow
@pytest.mark.timeout(3 * JOB_LIMIT_S)
@pytest.mark.parametrize("rank,signame", [(0, "SIGTERM"), (1, "SIGUSR1")])
def test_preemption_signal_to_either_rank_saves_the_step_and_requeues(job, rank, signame):
    root, config, clean = job
    run_dir = str(root / f"preempted{rank}")
    result = _deepspeed(config, run_dir, fault=f"{rank}:2:{signame}")  # sent before step 3; save_every is 2
    assert result.returncode == REQUEUE_EXIT, result.stdout[-3000:]
    assert "Traceback" not in result.stdout, result.stdout[-3000:]
    assert f"preempted ({signame}) at step 3" in result.stdout
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == "step-00000003"
    resumed = _deepspeed(config, run_dir)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert _losses(run_dir) == _losses(clean)


@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_LIMIT_S)
@pytest.mark.parametrize("node,signame", [(1, "SIGKILL"), (0, "SIGSTOP")])
def test_a_killed_or_stopped_node_is_named_by_every_survivor(job, tmp_path, node, signame):
    """Two 1-rank "nodes" on loopback. Node 1's rank killed: node 0 sees a closed connection and its
    peer's beats stop. Node 0's rank stopped: it also serves the job's store, which stops answering."""
    root, config, _ = job
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    procs = [subprocess.Popen(
        [f"{BIN}/deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n), "--master_addr",
         "127.0.0.1", "--master_port", port, INJECT, "--config", config, "--set", f"run_dir={tmp_path / 'run'}",
         "--no-eval"], cwd=REPO, env=_env(f"{node}:2:{signame}"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True) for n in (0, 1)]
    survivor = procs[1 - node]
    try:
        out = survivor.communicate(timeout=JOB_LIMIT_S)[0]  # a wait for TIMEOUT_S would end this test instead
    finally:
        for p in procs:  # the stopped or orphaned node: its whole session
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        faulty = procs[node].communicate()[0]
    # for the record (pytest -s): when the fault came and when the survivor gave up
    print(*[line for line in (faulty + out).splitlines() if "fault_inject:" in line or "lost a rank" in line], sep="\n")
    assert survivor.returncode == LOST_RANK_EXIT, out[-3000:]
    host = os.uname().nodename
    named = [f"lost a rank: rank {node} on {host}"]  # its beats stopped
    named += [f"served by rank {node} on {h} (store at 127.0.0.1:{port})" for h in (host, "127.0.0.1")]  # its store
    assert any(n in out for n in named), out[-3000:]
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(8 * JOB_LIMIT_S)
def test_chaos_runs_under_the_restart_launch_end_with_the_clean_parameters(job):
    """K runs, each with one fault at a random rank and step; the seed and the draws are printed."""
    root, config, clean = job
    seed = int(os.environ.get("MEGACLASS_CHAOS_SEED", random.SystemRandom().randrange(10**6)))
    rng = random.Random(seed)
    faults = [("SIGKILL", rng.randrange(2), rng.randrange(1, STEPS))]  # the first: a kill, as the restart promise says
    faults += [(rng.choice(["SIGKILL", "SIGTERM", "SIGSTOP"]), rng.randrange(2), rng.randrange(1, STEPS))
               for _ in range(2)]
    print(f"chaos seed {seed} (MEGACLASS_CHAOS_SEED={seed} repeats it): {faults}")
    for i, (signame, rank, step) in enumerate(faults):
        run_dir = str(root / f"chaos{i}")
        result = _restart_launch(config, run_dir, f"{rank}:{step}:{signame}")
        assert result.returncode == 0, f"{signame} to rank {rank} at step {step}:\n{result.stdout[-4000:]}"
        assert f"fault_inject: rank {rank} sends itself {signame}" in result.stdout
        _assert_same_state(run_dir, clean)
        assert _losses(run_dir) == _losses(clean)


@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_LIMIT_S)
def test_sigterm_to_the_restart_launch_saves_the_step_on_every_rank_and_stops(job):
    """A preemption of the node: torchrun itself gets SIGTERM (from rank 1, before step 3), forwards it to
    the ranks, which save step 3 and exit 75; torchrun stops instead of restarting."""
    root, config, _ = job
    run_dir = str(root / "launcher_sigterm")
    result = _restart_launch(config, run_dir, "1:2:SIGTERM:launcher")
    assert "fault_inject: rank 1 sends its launcher SIGTERM before step 3" in result.stdout, result.stdout[-3000:]
    assert result.returncode != 0, result.stdout[-3000:]
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == "step-00000003"
    assert result.stdout.count("exiting with 75") == 2, result.stdout[-3000:]  # both ranks: saved, requeue
    assert "loaded" not in result.stdout  # not restarted
