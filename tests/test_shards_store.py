"""Shards from a URL (an object store): `pipe:` commands and `file://` URLs (what webdataset's gopen opens)
stand in for `aws s3 cp`, `gsutil cat` or `curl`. The reference is the same shards read from their folder,
and the copy log each command writes (what was copied, how many times)."""
import multiprocessing as mp
import os
import time
from collections import Counter

import numpy as np
import pytest
import torch
from dist_utils import run_ranks
from engine_helpers import FlatLinear, write_webvision

from megaclass.data import store as store_module
from megaclass.data.metadata import load_metadata
from megaclass.data.shards import ShardDataset, convert, load_shards, shard_order
from megaclass.data.store import ShardFetchError, ShardStore, is_url
from megaclass.engine.config import ConfigError, config_from_dict
from megaclass.engine.data import load_run_data
from megaclass.engine.trainer import TrainData, Trainer


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    write_webvision(str(root / "wv"), classes=4, per_class=12, val_per_class=2, size=16)
    convert(root / "wv", root / "out", per_shard=10, progress=False)
    return root / "out"


def _logged_url(folder, log):
    """A pipe: URL that appends each file's name to `log`, then writes the file to stdout."""
    return f"pipe:echo {{name}} >> {log} && cat {folder}/{{name}}"


def _copies(log) -> Counter:
    return Counter(log.read_text().split()) if log.exists() else Counter()


def _same_samples(a: ShardDataset, b: ShardDataset) -> None:
    assert len(a) == len(b)
    for name in ("shard", "offset", "size", "label"):
        assert np.array_equal(getattr(a.columns, name), getattr(b.columns, name))
    assert list(a.columns.paths) == list(b.columns.paths)
    assert all(a._encoded(i) == b._encoded(i) for i in range(len(a)))


def test_what_is_a_url():
    assert is_url("pipe:aws s3 cp s3://b/{name} -") and is_url("https://host/shards") and is_url("s3://b/x")
    assert is_url("file:///data/shards")
    assert not is_url("/data/shards") and not is_url("shards") and not is_url("runs/a://b")


def test_a_url_reads_the_samples_of_its_folder_each_file_copied_once(shard_dir, tmp_path):
    log, cache = tmp_path / "copies.log", tmp_path / "cache"
    url = _logged_url(shard_dir, log)
    local, remote = load_shards(shard_dir), load_shards(url, cache=cache)
    # index.json and the sample indexes at once; a tar only when it is first read
    names = sorted(p.name for p in shard_dir.iterdir() if p.is_file())
    assert _copies(log) == Counter(n for n in names if not n.endswith(".tar"))
    assert remote.folder.parent.parent == cache and remote.classes == local.classes
    for split in ("train", "val"):
        _same_samples(ShardDataset(local, split, 16, train=False), ShardDataset(remote, split, 16, train=False))
    assert _copies(log) == Counter(names)  # every file, once
    again = load_shards(url, cache=cache)  # a second run on the node: only index.json is read again
    _same_samples(ShardDataset(local, "train", 16, train=False), ShardDataset(again, "train", 16, train=False))
    assert _copies(log) == Counter(names) + Counter(["index.json"])
    assert not [p for p in remote.folder.iterdir() if p.name.startswith(".") and p.name != ".locks"]  # no temp files


def test_a_base_url_gets_each_files_name_appended(shard_dir, tmp_path):
    remote = load_shards(f"file://{shard_dir}", cache=tmp_path)
    _same_samples(ShardDataset(load_shards(shard_dir), "train", 16, train=False), ShardDataset(remote, "train", 16, train=False))


def test_the_metadata_of_a_url_equals_its_folders(shard_dir, tmp_path):
    local, remote = load_metadata(shard_dir), load_metadata(_logged_url(shard_dir, tmp_path / "log"), cache=tmp_path)
    assert remote.synsets == local.synsets and remote.val == local.val and remote.skipped == local.skipped
    assert list(remote.train) == list(local.train) and len(local.train) == 48


@pytest.fixture
def no_pause(monkeypatch):
    monkeypatch.setattr(store_module, "PAUSE", 0.0)


def test_a_failing_command_is_tried_three_times_then_named(shard_dir, tmp_path, no_pause):
    with pytest.raises(ShardFetchError, match=r"^index.json: the command exited with status 7, after 3 tries of "
                                              r"copying it from 'pipe:exit 7 # index.json'"):
        load_shards("pipe:exit 7 # {name}", cache=tmp_path)


def test_a_failure_that_passes_is_retried(shard_dir, tmp_path, no_pause):
    flag, log = tmp_path / "failed-once", tmp_path / "log"
    url = f"pipe:if [ -e {flag} ]; then echo {{name}} >> {log}; cat {shard_dir}/{{name}}; else touch {flag}; exit 1; fi"
    remote = load_shards(url, cache=tmp_path / "cache")
    assert flag.exists() and len(remote.columns["train"]) == 48


def test_a_truncated_copy_is_refused_and_leaves_nothing(shard_dir, tmp_path, no_pause):
    url = f"pipe:case {{name}} in *.tar) head -c 3000 {shard_dir}/{{name}};; *) cat {shard_dir}/{{name}};; esac"
    remote = load_shards(url, cache=tmp_path)  # the tars are copied when read
    dataset = ShardDataset(remote, "train", 16, train=False)
    with pytest.raises(ShardFetchError, match=r"^train-000000.tar: 3000 bytes, index.json says \d+ \(a partial copy"):
        dataset._encoded(0)
    assert not list(remote.folder.glob("*.tar")) and not list(remote.folder.glob(".train*"))


def test_a_damaged_sample_index_is_refused(shard_dir, tmp_path, no_pause):
    url = f"pipe:cat {shard_dir}/{{name}}; case {{name}} in *.idx) echo extra;; esac"
    with pytest.raises(ShardFetchError, match=r"^train-000000.idx: \d+ bytes, index.json says \d+"):
        load_shards(url, cache=tmp_path / "longer")
    same_size = f"pipe:case {{name}} in *.idx) tr a b < {shard_dir}/{{name}};; *) cat {shard_dir}/{{name}};; esac"
    with pytest.raises(ShardFetchError, match=r"^train-000000.idx: a SHA-256 other than index.json's"):
        load_shards(same_size, cache=tmp_path / "same-size")


def test_a_shard_that_cannot_be_copied_stops_the_reader_instead_of_being_skipped(shard_dir, tmp_path, no_pause):
    url = f"pipe:case {{name}} in *.tar) exit 3;; *) cat {shard_dir}/{{name}};; esac"
    dataset = ShardDataset(load_shards(url, cache=tmp_path), "train", 72, train=True)
    with pytest.raises(ShardFetchError, match=r"train-0000\d\d.tar: the command exited with status 3"):
        dataset[0]  # an unreadable image would be skipped and counted; a missing shard is an error
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1)
    with pytest.raises(ShardFetchError, match=r"exited with status 3"):
        next(iter(loader))
    assert dataset.skips.sum() == 0 and not dataset.unreadable


def test_a_copy_that_stalls_is_stopped_and_retried(shard_dir, tmp_path, no_pause, monkeypatch):
    monkeypatch.setattr(store_module, "STALL_S", 0.5)
    with pytest.raises(ShardFetchError, match=r"^index.json: no data for 0.5 s \(the copy was stopped\), after 3 tries"):
        load_shards("pipe:sleep 30 # {name}", cache=tmp_path)


def test_a_scheme_gopen_cannot_open_is_refused_with_the_pipe_to_use():
    with pytest.raises(ValueError, match=r"s3:// is not opened directly; .* 'pipe:aws s3 cp s3://b/wv2/\{name\} -'"):
        ShardStore("s3://b/wv2/", "/tmp")


def test_a_reconverted_set_gets_a_cache_folder_of_its_own(shard_dir, tmp_path):
    copy = tmp_path / "copy"
    url = f"pipe:cat {copy}/{{name}}"
    write_webvision(str(tmp_path / "wv"), classes=4, per_class=12, val_per_class=2, size=16)
    convert(tmp_path / "wv", copy, per_shard=10, progress=False)
    first = load_shards(url, cache=tmp_path / "cache")
    ShardDataset(first, "train", 16, train=False)._encoded(0)
    convert(tmp_path / "wv", copy, per_shard=7, progress=False)  # the same images, other shards
    second = load_shards(url, cache=tmp_path / "cache")
    assert second.folder != first.folder and second.folder.parent == first.folder.parent
    _same_samples(ShardDataset(load_shards(copy), "train", 16, train=False), ShardDataset(second, "train", 16, train=False))


def _fetch_one(url, cache, name, size, barrier, results):
    store = ShardStore(url, cache)
    store.index()
    barrier.wait()
    results.put(store.fetch(name, size).stat().st_size)


def test_processes_of_a_node_copy_a_shard_once(shard_dir, tmp_path):
    log = tmp_path / "log"
    url = f"pipe:echo {{name}} >> {log}; sleep 0.3; cat {shard_dir}/{{name}}"
    size = (shard_dir / "train-000001.tar").stat().st_size
    ctx = mp.get_context("fork")  # as DataLoader workers are made
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_fetch_one, args=(url, tmp_path / "cache", "train-000001.tar", size, barrier, results))
             for _ in range(4)]
    for p in procs:
        p.start()
    sizes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sizes == [size] * 4 and _copies(log)["train-000001.tar"] == 1


def _hold_lock(lock_file, held, release):
    import fcntl

    with open(lock_file, "a") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        held.set()
        release.wait(60)


def test_without_waiting_a_shard_another_process_copies_is_left_to_it(shard_dir, tmp_path):
    store = ShardStore(f"pipe:cat {shard_dir}/{{name}}", tmp_path)
    store.index()
    (store.folder / ".locks").mkdir()
    ctx = mp.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(store.folder / ".locks" / "train-000002.tar", held, release))
    holder.start()
    try:
        assert held.wait(60)
        assert store.fetch("train-000002.tar", wait=False) is None and not store.path("train-000002.tar").exists()
    finally:
        release.set()
        holder.join(60)
    assert store.fetch("train-000002.tar").stat().st_size == (shard_dir / "train-000002.tar").stat().st_size


def _crossed(url, cache, mine, other, results):
    """A prefetch thread copies `mine` (slowly) while the main thread waits for `other`."""
    import threading

    store = ShardStore(url, cache)
    store.index()
    thread = threading.Thread(target=store.fetch, args=(mine,))
    thread.start()
    time.sleep(0.2)
    results.put(store.fetch(other).name)
    thread.join(60)


def test_two_processes_waiting_for_each_others_copy_both_finish(shard_dir, tmp_path):
    """Each process's thread holds one shard's lock while its main thread waits for the other's: a
    blocking POSIX lock would be refused here with EDEADLK (the kernel counts processes, not threads)."""
    url = f"pipe:sleep 1; cat {shard_dir}/{{name}}"
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    a, b = "train-000000.tar", "train-000001.tar"
    procs = [ctx.Process(target=_crossed, args=(url, tmp_path, mine, other, results)) for mine, other in ((a, b), (b, a))]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(60)
    assert got == [a, b] and all(p.exitcode == 0 for p in procs)


def test_prefetch_copies_the_tars_in_the_order_they_are_read(shard_dir, tmp_path):
    log = tmp_path / "log"
    dataset = ShardDataset(load_shards(_logged_url(shard_dir, log), cache=tmp_path), "train", 16, train=True)
    order = shard_order(len(dataset.sizes), 3, 1)
    dataset.prefetch(order).join(timeout=60)
    tars = [n for n in log.read_text().split() if n.endswith(".tar")]
    assert tars == [dataset.files[s].name for s in order]
    assert ShardDataset(load_shards(shard_dir), "train", 16, train=True).prefetch(order) is None  # a folder: nothing


def test_a_pipe_url_without_its_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.shards: 'pipe:aws s3 cp s3://bucket/shards/ -' is a pipe: URL "
                                          r"without \{name\}"):
        config_from_dict({"data": {"shards": "pipe:aws s3 cp s3://bucket/shards/ -"}})
    with pytest.raises(ConfigError, match=r"s3:// is not opened directly; give a command .* 'pipe:aws s3 cp "
                                          r"s3://bucket/shards/\{name\} -'"):
        config_from_dict({"data": {"shards": "s3://bucket/shards"}})


# -- training from a URL: two ranks with two loader workers each share one node's cache (72 px: above the
# size that is preloaded, so the loader workers read the tars, as at scale) ----------------------------
def _train(rank, world, shards, run_dir, cache):
    os.environ["LOCAL_RANK"] = str(rank)
    cfg = config_from_dict({
        "run_dir": run_dir, "head": {"bias": True},
        "data": {"num_workers": 2, "shards": shards, "shard_cache": cache, "shuffle_buffer": 10, "image_size": 72},
        "optim": {"name": "sgd", "lr": 0.3, "momentum": 0.9},
        "train": {"micro_batch_size": 3, "grad_accum": 1, "epochs": 2, "progress": False},
    })
    data = load_run_data(cfg)
    torch.manual_seed(0)
    trainer = Trainer(cfg, TrainData(data.train, data.num_classes, data.labels), backbone=FlatLinear(3 * 72 * 72, 8))
    rows = trainer.fit()
    trainer.close()
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.timeout(600)
def test_training_from_a_url_equals_training_from_the_folder(shard_dir, tmp_path):
    log = tmp_path / "log"
    remote = run_ranks(_train, 2, _logged_url(shard_dir, log), str(tmp_path / "remote"), str(tmp_path / "cache"))
    local = run_ranks(_train, 2, str(shard_dir), str(tmp_path / "local"), None)
    assert len(local[0]) == 16 and remote[0] == remote[1] == local[0] == local[1]  # 48 images, batch 6, 2 epochs
    # one copy of every training tar for the node (2 ranks × 2 workers and 2 prefetch threads), no val tar read
    copies = _copies(log)
    assert {n: k for n, k in copies.items() if n.startswith("train-") and n.endswith(".tar")} == {
        f"train-{i:06d}.tar": 1 for i in range(5)}
    assert "val-000000.tar" not in copies
