"""Resuming a ZeRO 1-3 checkpoint at another world size, through DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds one optimizer partition per rank (`ds/*_optim_states.pt`), cut for the number
of ranks that wrote it. DeepSpeed's converter (`deepspeed.checkpoint.ds_to_universal`) merges the
partitions into whole tensors, one folder per parameter (`zero/<name>/fp32.pt`, `exp_avg.pt`, …), and
its engine loads those at any world size (config `checkpoint.load_universal`). megaclass only runs the
conversion, on rank 0, once per checkpoint, next to the checkpoint it converts:

    step-…/ds/...              as saved
    step-…/universal/ds/...    DeepSpeed's universal checkpoint of it (written as .tmp-universal/, renamed
                               when complete; a later load at another world size reuses it)

SGD. DeepSpeed 0.19.8's converter reads Adam's state names only (`exp_avg`, `exp_avg_sq`: a KeyError
for SGD), and its ZeRO-3 loader restores only those. SGD's one state, `momentum_buffer`, is therefore
passed through under Adam's name: the converter reads a copy of the optimizer files with the momentum
as `exp_avg` (and as `exp_avg_sq`, which it requires and which is dropped again). At ZeRO 1-2, whose
loader restores whatever state files a parameter's folder holds, the converted files are renamed back
to `momentum_buffer.pt`; at ZeRO 3 the loaded `exp_avg` is moved to `momentum_buffer` after the load
(`restore_sgd_state`). Any other optimizer whose state is not Adam's is refused before converting.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import shutil
import sys
import time

import torch
from deepspeed.checkpoint import ds_to_universal
from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                            UNIVERSAL_CHECKPOINT_VERSION_VALUE)

from megaclass.io import atomic_write_text, replace_folder, torch_save
from megaclass.parallel import comm

log = logging.getLogger(__name__)

FOLDER, TMP = "universal", ".tmp-universal"
MARKER = "megaclass.json"  # in the universal folder: how SGD's state was carried
ADAM_STATES = ("exp_avg", "exp_avg_sq")


class ConversionError(ValueError):
    """The checkpoint could not be converted; raised on every rank alike."""


def describe(module: torch.nn.Module) -> None:
    """What `ds_to_universal` requires of a saved model state (`universal_checkpoint_info`): a plain
    data-parallel model needs only the format version (no tensor-parallel or vocabulary patterns).
    DeepSpeed's engine saves this attribute of its module; set before saving, it makes the checkpoint
    convertible by DeepSpeed's own command as well."""
    setattr(module, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})


def convert(folder: str, stage: int) -> str:
    """Collective: `folder/universal/`, DeepSpeed's universal checkpoint of `folder/ds` (saved at ZeRO
    `stage`), converted by rank 0 unless it is already there; the other ranks wait for it. A failure on
    rank 0 raises `ConversionError` on every rank, naming the checkpoint and the cause."""
    target = os.path.join(folder, FOLDER)
    error = None
    if comm.rank() == 0 and not os.path.isdir(target):
        try:
            _convert(folder, target, stage)
        except Exception as exc:  # noqa: BLE001 - whatever stopped rank 0 must reach every rank, or they wait for ever
            shutil.rmtree(os.path.join(folder, TMP), ignore_errors=True)
            error = f"{type(exc).__name__}: {exc}"
    error = comm.gather_objects(error)[0]
    if error is not None:
        raise ConversionError(f"{folder}/ds: converting it to a DeepSpeed universal checkpoint (to resume at another "
                              f"world size) failed on rank 0: {error}")
    return target


def _convert(folder: str, target: str, stage: int) -> None:
    start = time.perf_counter()
    tmp = os.path.join(folder, TMP)
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion that died before its rename
    os.makedirs(tmp)
    source = os.path.join(folder, "ds")
    sgd = _optimizer_state_names(source, stage) != set(ADAM_STATES)
    if sgd:
        source = _momentum_as_adam(source, os.path.join(tmp, "input"), stage)
    args = argparse.Namespace(input_folder=source, output_folder=os.path.join(tmp, "ds"), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # checkpoints saved before `describe` existed
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines are not a command's results
        ds_to_universal.main(args)
    if sgd:
        shutil.rmtree(os.path.join(tmp, "input"))
        if stage < 3:
            _rename_states(os.path.join(tmp, "ds", "zero"))
    atomic_write_text(os.path.join(tmp, MARKER), json.dumps({"zero_stage": stage, "sgd": sgd}))
    replace_folder(tmp, target)
    log.info("converted %s/ds to a universal checkpoint in %s (%.1f s)", folder, target, time.perf_counter() - start)


def _base_state(sd: dict, stage: int) -> tuple[dict, list[torch.Tensor]]:
    """(the wrapped torch optimizer's per-group state, the flat fp32 partitions) of one optimizer file."""
    optim = sd["optimizer_state_dict"]
    if stage < 3:
        return optim["base_optimizer_state"]["state"], optim["single_partition_of_fp32_groups"]
    return optim["optimizer_state_dict"]["state"], optim["fp32_flat_groups"]


def _optimizer_state_names(ds: str, stage: int) -> set[str]:
    """The state names (besides `step`) of the first optimizer partition."""
    files = sorted(glob.glob(os.path.join(ds, "*_optim_states.pt")))
    if not files:
        raise FileNotFoundError(f"{ds}: no *_optim_states.pt files (ZeRO's optimizer partitions)")
    states, _ = _base_state(torch.load(files[0], map_location="cpu", weights_only=False), stage)
    return {key for state in states.values() for key in state if key != "step"}


def _momentum_as_adam(ds: str, out: str, stage: int) -> str:
    """A copy of the checkpoint `ds` in `out` whose optimizer files carry SGD's `momentum_buffer` as
    `exp_avg` and `exp_avg_sq` (zeros without momentum), and at ZeRO 3 a `step` (its loader reads one).
    Model-state files are linked."""
    os.makedirs(out)
    for path in glob.glob(os.path.join(ds, "*.pt")):
        name = os.path.basename(path)
        if not name.endswith("_optim_states.pt"):
            os.symlink(os.path.abspath(path), os.path.join(out, name))
            continue
        sd = torch.load(path, map_location="cpu", weights_only=False)
        states, flats = _base_state(sd, stage)
        for group, flat in enumerate(flats):
            state = states.setdefault(group, {})
            other = set(state) - {"momentum_buffer", "step"}
            if other:
                raise ConversionError(f"{path}: optimizer state {sorted(other)} is neither Adam's ({', '.join(ADAM_STATES)}) "
                                      f"nor SGD's (momentum_buffer); DeepSpeed's universal checkpoint converts those only")
            momentum = state.pop("momentum_buffer", None)
            state["exp_avg"] = state["exp_avg_sq"] = torch.zeros_like(flat) if momentum is None else momentum
            if stage == 3:
                state.setdefault("step", 0)
        torch_save(sd, os.path.join(out, name))
    return out


def _rename_states(zero: str) -> None:
    """ZeRO 1-2: each parameter's `exp_avg.pt` back to `momentum_buffer.pt` (its loader restores every
    state file it finds, under the file's name), `exp_avg_sq.pt` removed."""
    for param in os.listdir(zero):
        folder = os.path.join(zero, param)
        if not os.path.isdir(folder):
            continue
        os.remove(os.path.join(folder, "exp_avg_sq.pt"))
        os.replace(os.path.join(folder, "exp_avg.pt"), os.path.join(folder, "momentum_buffer.pt"))


@contextlib.contextmanager
def loading(engine):
    """DeepSpeed's engine reads `checkpoint.load_universal` from its config at load time: set for this load only."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


def restore_sgd_state(engine, universal: str) -> None:
    """ZeRO 3 after loading an SGD checkpoint: its loader put the momentum under Adam's names (and a
    `step`); SGD reads `momentum_buffer`. Nothing to do at ZeRO 1-2 (renamed files) or for Adam."""
    with open(os.path.join(universal, MARKER), encoding="utf-8") as f:
        sgd = json.load(f)["sgd"]
    if not sgd or engine.zero_optimization_stage() < 3:
        return
    basic = engine.optimizer.optimizer
    momentum = any(group.get("momentum", 0) != 0 for group in basic.param_groups)
    for state in basic.state.values():
        buffer = state.pop("exp_avg")
        state.pop("exp_avg_sq")
        state.pop("step", None)
        if momentum:
            state["momentum_buffer"] = buffer
