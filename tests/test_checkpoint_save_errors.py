"""A save that fails (a full disk, an I/O error) raises on every rank naming the file and the cause,
removes its partial folder and leaves `latest` on the previous checkpoint; with
checkpoint.on_save_error "continue" training goes on and the next save succeeds and resumes exactly.

Failures are injected where files are written: every file a save opens for writing is counted (a clean
save enumerates them, per rank), then a save is run once for each (rank, k) with the k-th write of that
rank failing with ENOSPC, as a full disk fails it (the file is created, its first write fails). A real
full disk is a 2 MB tmpfs (root may mount one)."""
import builtins
import errno
import io
import os
import re
import subprocess

import pytest
import torch
from dist_utils import run_ranks
from engine_helpers import FlatLinear, random_items

from megaclass.engine import checkpoint
from megaclass.engine.config import ConfigError, config_from_dict
from megaclass.engine.trainer import TrainData, Trainer

N, CLASSES = 16, 5


def _trainer(run_dir, policy="stop"):
    cfg = config_from_dict({
        "run_dir": run_dir, "data": {"num_workers": 0}, "parallel": {"zero_stage": 1},  # a file per rank
        "checkpoint": {"on_save_error": policy},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "train": {"micro_batch_size": 2, "max_steps": 1, "progress": False},
    })
    items = random_items(N, CLASSES)
    return Trainer(cfg, TrainData(items, CLASSES, items.labels), backbone=FlatLinear(48, 8))


class _FullDisk:
    """A file whose writes fail as on a full disk (ENOSPC, no file name: as the OS reports it)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fileno(self):  # shutil.copyfile then writes with write(), not with os.sendfile past this wrapper
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class _Writes:
    """Within `with`: every file opened for writing under `root` is recorded; the `fail`-th (0-based)
    gets a full disk. builtins.open and io.open (pathlib's) are the one way Python code opens a file."""

    def __init__(self, root, fail=None):
        self.root, self.fail, self.paths = os.path.realpath(root), fail, []

    def _open(self, file, mode="r", *args, **kwargs):
        f = self._real(file, mode, *args, **kwargs)
        if (isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
                and os.path.realpath(file).startswith(self.root + os.sep)):
            self.paths.append(os.fspath(file))
            if len(self.paths) - 1 == self.fail:
                return _FullDisk(f)
        return f

    def __enter__(self):
        self._real = builtins.open
        builtins.open = io.open = self._open
        return self

    def __exit__(self, *exc):
        builtins.open = io.open = self._real


def _target(path):
    """The file an atomic write's temp file (`.NAME.<8 random><NAME's suffix>`, megaclass.io) becomes."""
    folder, base = os.path.split(path)
    temp = re.fullmatch(r"\.(.+?(\.[^.]+|))\.\w{8}\2", base)
    return os.path.join(folder, temp.group(1)) if temp else path


def _state(t):
    """The trainer's whole training state, as CPU tensors (backbone, head, head momentum)."""
    out = {f"engine.{k}": v.detach().clone() for k, v in t.engine.module.state_dict().items()}
    out["head.weight"] = t.head.weight.detach().clone()
    out["head.momentum"] = t.head_optimizer.state[t.head.weight]["momentum_buffer"].clone()
    return out


def _listing(root):
    return sorted(os.listdir(root))


def _failures_at_each_write(rank, world, root):
    from megaclass.parallel import comm

    os.environ["LOCAL_RANK"] = str(rank)
    ckpt = f"{root}/checkpoints"
    t = _trainer(root)
    t.fit()  # step 1, saved
    t.step = 2
    with _Writes(ckpt) as clean:  # the writes of one save, on this rank
        t.save()
    counts = [c for (c,) in comm.gather_ints([len(clean.paths)])]
    before = _listing(ckpt)
    cases = []
    for failing_rank, count in enumerate(counts):
        for k in range(count):
            t.step += 1
            with _Writes(ckpt, fail=k if rank == failing_rank else None) as writes:
                try:
                    t.save()
                    error = None
                except checkpoint.SaveError as exc:
                    error = str(exc)
            failed = writes.paths[k] if rank == failing_rank else None
            cases.append({"rank": failing_rank, "k": k, "error": error, "failed": failed and _target(failed),
                          "listing": _listing(ckpt), "latest": checkpoint.latest_checkpoint(ckpt)})
            comm.barrier()  # every rank looked before the next save starts

    # checkpoint.on_save_error: continue. A failure on rank 1 alone; training goes on; the next save works
    t.cfg.checkpoint.on_save_error = "continue"
    t.last_step = 10**6  # these saves are in the middle of the run (a failed last save always raises)
    t.step += 1
    with _Writes(ckpt, fail=0 if rank == 1 else None):
        skipped = t.save()
    t.step += 1
    saved = t.save()
    state = _state(t)
    t.close()
    again = _trainer(root)
    resumed_step = again.resume()
    same = all(torch.equal(v, _state(again)[k]) for k, v in state.items())
    again.close()
    return {"counts": counts, "before": before, "cases": cases, "skipped": skipped, "saved": saved,
            "step": t.step, "resumed_step": resumed_step, "same": same, "paths": clean.paths}


@pytest.mark.timeout(300)
def test_a_save_failing_at_each_write_names_it_removes_the_partial_folder_and_keeps_latest(tmp_path):
    results = run_ranks(_failures_at_each_write, 2, str(tmp_path))
    counts = results[0]["counts"]
    # rank 0: DeepSpeed's model, its ZeRO optimizer partition and its two recovery scripts (zero_to_fp32.py,
    # zero_to_torch.py), its head shard, meta.json, latest; rank 1: its ZeRO optimizer partition and head shard
    assert counts == [7, 2], [r["paths"] for r in results]
    assert results[0]["before"] == ["latest", "step-00000001", "step-00000002"]
    for i in range(sum(counts)):
        failing = results[results[0]["cases"][i]["rank"]]["cases"][i]
        for got in (results[0]["cases"][i], results[1]["cases"][i]):
            # the same error on every rank: the file that failed and why
            assert got["error"] is not None, (i, got)
            assert got["error"] == results[0]["cases"][i]["error"]
            named = failing["failed"]
            if named.endswith(("zero_to_fp32.py", "zero_to_torch.py")):  # shutil.copyfile's error names no file
                named = os.path.dirname(named)
            assert f"rank {failing['rank']}: {named}: No space left on device" in got["error"], got
            assert "still names step-00000002" in got["error"]
            assert got["listing"] == results[0]["before"], (i, got)  # no partial folder, nothing else
            assert os.path.basename(got["latest"]) == "step-00000002"
    for got in results:
        assert got["skipped"] is None and got["saved"].endswith(f"step-{got['step']:08d}")
        assert got["resumed_step"] == got["step"] and got["same"]


def test_checkpoint_keep_is_at_least_two_and_the_policy_is_checked():
    with pytest.raises(ConfigError, match="checkpoint.keep: must be >= 2"):
        config_from_dict({"checkpoint": {"keep": 1}})
    with pytest.raises(ConfigError, match="checkpoint.on_save_error: must be one of stop, continue"):
        config_from_dict({"checkpoint": {"on_save_error": "ignore"}})


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs at tmp_path/disk, unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def _full_disk(rank, world, root):
    from megaclass.parallel import comm

    os.environ["LOCAL_RANK"] = str(rank)
    ckpt = f"{root}/checkpoints"
    t = _trainer(root, policy="continue")
    t.fit()  # step 1, saved
    size = sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(f"{ckpt}/step-00000001") for name in names)
    filler = f"{root}/filler"
    if rank == 0:  # the disk keeps room for a third of a checkpoint
        with open(filler, "wb") as f:
            f.write(b"\0" * (os.statvfs(root).f_bavail * os.statvfs(root).f_frsize - size // 3))
    comm.barrier()
    t.last_step = 10**6
    t.step = 2
    try:
        checkpoint.save(ckpt, t.step, t.engine, t.head, t.head_optimizer, t.class_range, CLASSES, writer=rank == 0)
        error = None
    except checkpoint.SaveError as exc:
        error = str(exc)
    listing, latest = _listing(ckpt), checkpoint.latest_checkpoint(ckpt)
    comm.barrier()
    skipped = t.save()  # continue mode: logged, not raised
    comm.barrier()
    if rank == 0:
        os.remove(filler)  # room again: the next save works
    comm.barrier()
    t.step = 3
    saved = t.save()
    state = _state(t)
    t.close()
    again = _trainer(root)
    step = again.resume()
    same = all(torch.equal(v, _state(again)[k]) for k, v in state.items())
    again.close()
    return {"error": error, "listing": listing, "latest": latest, "skipped": skipped, "saved": saved,
            "step": step, "same": same}


@pytest.mark.timeout(300)
def test_a_full_disk_names_the_file_and_the_next_save_after_room_is_made_resumes_exactly(small_disk):
    results = run_ranks(_full_disk, 2, str(small_disk))
    for got in results:
        assert got["error"] is not None and "No space left on device" in got["error"], got["error"]
        assert f"{small_disk}/checkpoints/.tmp-step-00000002/" in got["error"]  # the file that did not fit
        assert "inline_container" not in got["error"]
        assert got["listing"] == ["latest", "step-00000001"]
        assert os.path.basename(got["latest"]) == "step-00000001"
        assert got["skipped"] is None and got["saved"].endswith("step-00000003")
        assert got["step"] == 3 and got["same"]
    assert results[0]["error"] == results[1]["error"]
