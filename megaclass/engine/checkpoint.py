"""Atomic checkpoints: the DeepSpeed engine's checkpoint plus the class-sharded head.

Layout of `run_dir/checkpoints/`:

    step-00000120/ds/...                    DeepSpeed's files (engine.save_checkpoint, tag "ds")
    step-00000120/head/shard-00000.pt       rank r's head rows [start, end) + their optimizer state
    step-00000120/meta.json                 step, world size, ZeRO stage, class count and ordered class list
    latest                                  "step-00000120", replaced last

A save writes everything into `.tmp-step-…/`, and only when every rank has finished does rank 0
rename it to `step-…/` and then replace `latest`. A save killed at any point therefore leaves
`latest` naming the previous, complete checkpoint. Saving a step that already has a folder first
moves the old folder to `.old-step-…/`; if the save dies before the new folder takes its place,
`latest_checkpoint` falls back to that old folder. Every rank writes into the same folder, so
`run_dir` must be on a file system all nodes share.

A write that fails on any rank (no space, an I/O error, no permission) raises `SaveError` on every rank,
naming the file and the OS's cause, after the partial folder is removed (`save`).

Head shards re-shard on load (see `megaclass.nn.checkpoint.load_head_shard`), so a run can resume on another number of
ranks. The backbone's DeepSpeed checkpoint is world-size independent at ZeRO stage 0; at stages 1-3 `load`
converts it to DeepSpeed's universal checkpoint first (`megaclass.engine.universal`, into
`step-…/universal/`) and loads that.

A damaged checkpoint (truncated or empty `.pt` files, a broken or incomplete `meta.json`, a missing
`ds/` folder, `latest` naming anything but a folder of its own `checkpoints/`) raises
`CheckpointError` naming the file and what is wrong, on every rank alike, before anything is loaded.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import pickle
import shutil
import zipfile

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.pipe.engine import PipelineEngine

from megaclass.engine import universal
from megaclass.nn.checkpoint import head_shard_state, load_head_shard, save_head_shard
from megaclass.io import atomic_write_text, replace_folder, torch_save
from megaclass.parallel import comm

log = logging.getLogger(__name__)

LATEST = "latest"
OLD = ".old-"
META_KEYS = ("step", "world_size", "num_classes")  # the integers `load` needs


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or malformed; the message names the file."""


def latest_checkpoint(root: str) -> str | None:
    """The folder `latest` names, or None when there is no complete checkpoint. `latest` must name a
    folder directly inside `root` (links resolved): never another run's checkpoint."""
    pointer = os.path.join(root, LATEST)
    if not os.path.exists(pointer):
        return None
    try:
        with open(pointer, encoding="utf-8") as f:
            tag = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer}: unreadable ({exc})") from None
    real_root = os.path.realpath(root)
    if (not tag or tag != os.path.basename(tag) or tag in (".", "..")
            or os.path.dirname(os.path.realpath(os.path.join(root, tag))) != real_root):
        raise CheckpointError(f"{pointer}: names {tag!r}, which is not a checkpoint folder of {root} "
                              f"(it must name one of its own step-… folders)")
    folder = os.path.join(root, tag)
    if os.path.isfile(os.path.join(folder, "meta.json")):
        return folder
    old = os.path.join(root, OLD + tag)  # a re-save of this step died between its two renames
    if os.path.isfile(os.path.join(old, "meta.json")):
        return old
    raise FileNotFoundError(f"{pointer} names {tag!r}, but {folder}/meta.json is missing")


def save(root: str, step: int, engine, head, head_optimizer, class_range, num_classes: int,
         writer: bool, keep: int = 2, extra_meta: dict | None = None, extra=None) -> str:
    """Collective: every rank calls it. Returns the checkpoint folder. `extra`, when given, is called
    on every rank with the folder being written, to add that rank's own files (its failures count).

    A write that fails on any rank (no space, an I/O error, no permission) raises `SaveError` on every
    rank, naming each failed file and its cause, after the partial `.tmp-step-…/` is removed; `latest`
    still names the previous complete checkpoint. The ranks agree after each phase (`_agree`)."""
    tag = f"step-{step:08d}"
    final, tmp = os.path.join(root, tag), os.path.join(root, f".tmp-{tag}")
    failures: list[str] = []  # this rank's failed writes, "path: cause"
    if writer:
        _attempt(failures, tmp, lambda: _fresh_folder(root, tmp))
    _agree(failures, step, root, tmp, writer)
    universal.describe(engine.module)
    with _recorded_writes(engine, failures):
        _attempt(failures, os.path.join(tmp, "ds"),
                 lambda: engine.save_checkpoint(tmp, tag="ds", client_state={"step": step}, save_latest=False))
    if head is not None and not failures:  # pipeline mode: only the last stage holds the head
        shard = os.path.join(tmp, "head", f"shard-{class_range[0]:09d}.pt")
        state = head_shard_state(head, head_optimizer, class_range, num_classes)
        _attempt(failures, shard, lambda: save_head_shard(shard, state))
    if extra is not None:
        _attempt(failures, tmp, lambda: extra(tmp))
    _agree(failures, step, root, tmp, writer)
    if writer:
        meta = {"step": step, "world_size": comm.world_size(), "zero_stage": engine.zero_optimization_stage(),
                "num_classes": num_classes, **(extra_meta or {})}
        _attempt(failures, tmp, lambda: _commit(root, tag, meta, keep))
    _agree(failures, step, root, tmp, writer)
    return final


class SaveError(OSError):
    """A checkpoint save failed; raised on every rank alike, naming each failed file and its cause."""


def _attempt(failures: list[str], path: str, write) -> None:
    """Run `write` unless this rank already failed; record its OSError as "path: cause" (the file
    the OS names, else `path`) instead of raising, so that this rank still meets its peers."""
    if failures:
        return
    try:
        write()
    except OSError as exc:
        failures.append(f"{exc.filename or path}: {exc.strerror or exc}")


@contextlib.contextmanager
def _recorded_writes(engine, failures: list[str]):
    """DeepSpeed's file writes (its checkpoint engine's `save`, through `io.torch_save`, and the copy of
    its recovery scripts) record a failure instead of raising it: `save_checkpoint` runs collectives
    between and after its writes, and a rank that raised out of it would leave its peers waiting in
    them. Writes after a failure are skipped."""
    writer = engine.checkpoint_engine
    copy_scripts = engine._copy_recovery_script
    engine._copy_recovery_script = lambda path: _attempt(failures, path, lambda: copy_scripts(path))
    if isinstance(writer, TorchCheckpointEngine):  # another engine (async, Nebula) writes its own way
        writer.save = lambda state_dict, path: _attempt(
            failures, path, lambda: torch_save(state_dict, path, writer.zipfile_serialization))
    try:
        yield
    finally:  # the classes' methods again
        del engine._copy_recovery_script
        writer.__dict__.pop("save", None)


def _agree(failures: list[str], step: int, root: str, tmp: str, writer: bool) -> None:
    """Collective, at the end of each phase of a save (a barrier): when a write failed on any rank, the
    writer removes the partial folder and every rank raises the same SaveError."""
    everyone = comm.gather_objects(failures)
    if not any(everyone):
        return
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
    comm.barrier()  # the partial folder is gone before any rank goes on (and may retry)
    try:
        previous = latest_checkpoint(root)
    except (OSError, ValueError):
        previous = None
    lines = "; ".join(f"rank {r}: {message}" for r, messages in enumerate(everyone) for message in messages)
    raise SaveError(f"checkpoint of step {step} not saved: {lines}. Removed {tmp}; {os.path.join(root, LATEST)} "
                    f"{'still names ' + os.path.basename(previous) if previous else 'does not exist (no checkpoint yet)'}")


def _fresh_folder(root: str, tmp: str) -> None:
    os.makedirs(root, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)


def _commit(root: str, tag: str, meta: dict, keep: int) -> None:
    """Writer only: meta.json, the rename to `step-…/`, then `latest` (the commit point), then pruning.
    A failure before `latest` names the new folder puts the folders back as they were."""
    final, tmp, old = os.path.join(root, tag), os.path.join(root, f".tmp-{tag}"), os.path.join(root, OLD + tag)
    atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
    moved_aside = os.path.exists(final)
    if moved_aside:  # `latest` may name it: keep it (as `old`) until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        replace_folder(tmp, final)  # durable before `latest` names it
        atomic_write_text(os.path.join(root, LATEST), tag)
    except OSError:
        if _names(root) != tag:  # not committed: the new folder goes, the old one comes back
            if os.path.isdir(final) and not os.path.exists(tmp):
                shutil.rmtree(final, ignore_errors=True)
            if moved_aside:
                os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _prune(root, keep)


def _names(root: str) -> str | None:
    """What `root/latest` names now (None when it cannot be read)."""
    try:
        with open(os.path.join(root, LATEST), encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _prune(root: str, keep: int) -> None:
    tags = sorted(t for t in os.listdir(root) if t.startswith("step-"))
    for tag in tags[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
    for name in os.listdir(root):
        if name.startswith(".tmp-") or (name.startswith(OLD) and os.path.isdir(os.path.join(root, name[len(OLD):]))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _check_torch_file(path: str) -> None:
    """A file written by `torch.save` is a zip archive whose directory sits at its end: a truncated
    or empty file has none. Reading the directory alone finds that, without reading the tensors."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise CheckpointError(f"{path}: empty (0 bytes); the checkpoint is damaged")
        with zipfile.ZipFile(path) as archive:
            end = max((info.header_offset + info.compress_size for info in archive.infolist()), default=0)
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{path}: not a complete torch.save file ({exc}; truncated?)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from None
    if end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, its directory names data up to byte {end})")


def read_meta(folder: str) -> dict:
    """`folder/meta.json`, checked: a JSON object with the integers `step`, `world_size`, `num_classes`."""
    path = os.path.join(folder, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {folder} is not a complete checkpoint") from None
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: unreadable or not JSON ({exc}); truncated?") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key in META_KEYS:
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{path}: {key!r} missing or not a non-negative integer (got {value!r})")
    return meta


def check_files(folder: str, head: bool) -> None:
    """Every file `load` will read exists and is a complete torch.save file: `ds/` (DeepSpeed's
    model-states files) and, with `head`, `head/shard-*.pt`."""
    ds = os.path.join(folder, "ds")
    if not os.path.isdir(ds):
        raise CheckpointError(f"{ds}: missing; the backbone's DeepSpeed checkpoint is not there")
    files = sorted(glob.glob(os.path.join(ds, "*.pt")))
    if not any(name.endswith("model_states.pt") for name in files):
        raise CheckpointError(f"{ds}: no *model_states.pt file (DeepSpeed's model checkpoint)")
    if head:
        shards = sorted(glob.glob(os.path.join(folder, "head", "shard-*.pt")))
        if not shards:
            raise CheckpointError(f"{folder}/head: no head shards (shard-*.pt)")
        files += shards
    for path in files:
        _check_torch_file(path)
    for path in files[len(files) - len(shards):] if head else ():
        _check_head_shard(path)


def _check_head_shard(path: str) -> None:
    """The fields `load_head_shard` reads (memory-mapped: the tensors themselves are not read)."""
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a loadable head shard ({type(exc).__name__}: {exc})") from None
    ints = ("class_start", "class_end", "num_classes")
    if (not isinstance(shard, dict) or any(not isinstance(shard.get(k), int) for k in ints)
            or not isinstance(shard.get("params"), dict) or not isinstance(shard.get("optim"), dict)
            or not torch.is_tensor(shard["params"].get("weight"))):
        raise CheckpointError(f"{path}: not a head shard (needs {', '.join(ints)}, params['weight'], optim)")
    rows = shard["class_end"] - shard["class_start"]
    if not 0 <= shard["class_start"] < shard["class_end"] <= shard["num_classes"] or shard["params"]["weight"].shape[0] != rows:
        raise CheckpointError(f"{path}: class range [{shard['class_start']}, {shard['class_end']}) does not fit its "
                              f"{shard['num_classes']} classes or its {tuple(shard['params']['weight'].shape)} weight")


def check_classes(folder: str, meta: dict, classes) -> None:
    """This run's class list (wnids in class-index order) must be the checkpoint's, order included: the
    same classes in another order would silently relabel every prediction. A checkpoint saved before
    meta.json recorded its classes is accepted with a warning (its class count is still checked)."""
    if classes is None:
        return
    path, saved = os.path.join(folder, "meta.json"), meta.get("classes")
    if saved is None:
        log.warning("%s: records no class list (saved by an older megaclass): only the class count is checked; "
                    "this run must list its %d classes in the order the model was trained with", path, len(classes))
        return
    if not isinstance(saved, list) or not all(isinstance(w, str) for w in saved):
        raise CheckpointError(f"{path}: 'classes' is not a list of class ids (wnids)")
    classes = list(classes)
    if saved != classes:
        i = next((i for i, (a, b) in enumerate(zip(saved, classes)) if a != b), min(len(saved), len(classes)))
        expected = saved[i] if i < len(saved) else f"no class (it has {len(saved)})"
        found = classes[i] if i < len(classes) else f"no class (it has {len(classes)})"
        raise CheckpointError(f"{path}: the checkpoint's class list differs from this run's (info/synsets.txt), first "
                              f"at class index {i}: the checkpoint has {expected}, this run {found}. The model's "
                              f"outputs are in the checkpoint's order: use the class list it was trained with")


def load(folder: str, engine, head, head_optimizer, class_range, num_classes: int, classes=None) -> int:
    """Collective: restore the engine and this rank's head rows from `folder`; returns the step.
    `classes`: this run's wnids in class-index order (checked against the checkpoint's), or None."""
    meta = read_meta(folder)
    check_files(folder, head is not None)
    check_classes(folder, meta, classes)
    if meta["num_classes"] != num_classes:
        raise CheckpointError(f"{folder}: checkpoint has {meta['num_classes']} classes, this run {num_classes}")
    same_world = meta["world_size"] == comm.world_size()
    stage = engine.zero_optimization_stage()
    saved_stage = meta.get("zero_stage", stage)
    convert = not same_world and stage > 0
    if not same_world:
        _check_reshardable(folder, meta, saved_stage, engine)
    try:
        source = universal.convert(folder, saved_stage) if convert else folder
    except universal.ConversionError as exc:
        raise CheckpointError(str(exc)) from None
    # ZeRO 0's optimizer state is whole on every rank: it loads at any world size (a pipeline's: `_check_reshardable`)
    optimizer_states = same_world or not isinstance(engine, PipelineEngine)
    try:
        with universal.loading(engine) if convert else contextlib.nullcontext():
            path, client = engine.load_checkpoint(source, tag="ds", load_lr_scheduler_states=True,
                                                  load_optimizer_states=optimizer_states)
    except (AssertionError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{source}/ds: DeepSpeed could not load it ({type(exc).__name__}: {exc})") from exc
    if path is None:
        raise FileNotFoundError(f"{folder}/ds: DeepSpeed found no checkpoint to load")
    if convert:
        universal.restore_sgd_state(engine, source)
    if head is not None:
        load_head_shard(os.path.join(folder, "head"), head, head_optimizer, class_range, num_classes)
    return int(client["step"])


def _check_reshardable(folder: str, meta: dict, saved_stage: int, engine) -> None:
    """What a load at another world size cannot do, refused before anything is read. ZeRO 0 keeps whole
    replicas (any world size loads them, the optimizer state too, except a pipeline's: below); ZeRO 1-3
    go through the universal checkpoint, which needs ZeRO at both ends, at the same stage."""
    stage = engine.zero_optimization_stage()
    where = (f"{folder}: saved by {meta['world_size']} ranks with ZeRO stage {saved_stage}, resumed by "
             f"{comm.world_size()} ranks with ZeRO stage {stage}")
    if saved_stage != stage and max(saved_stage, stage) > 0:
        raise CheckpointError(
            f"{where}: at another world size a ZeRO checkpoint is resumed through DeepSpeed's universal checkpoint, "
            f"which megaclass converts for the same ZeRO stage only. Resume with ZeRO stage {saved_stage} "
            f"(parallel.zero_stage), or with {meta['world_size']} ranks")
    if isinstance(engine, PipelineEngine) or glob.glob(os.path.join(folder, "ds", "layer_*-model_states.pt")):
        if stage > 0:
            raise CheckpointError(
                f"{where}: megaclass converts data-parallel checkpoints to DeepSpeed's universal checkpoint, not a "
                f"pipeline's (parallel.pipeline_stages > 1: per-layer files, optimizer partitions per stage). Resume "
                f"with {meta['world_size']} ranks")
        log.warning("%s: a pipeline's optimizer state (momentum) is not loaded at another world size, only its "
                    "weights", where)
