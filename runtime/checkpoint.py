"""Checkpoints: the training state plus where training stands, written atomically.

A checkpoint is an .npz: one array per state tensor (named as the graph inputs) and `__meta__`, a JSON
string with step, bad_steps, the sums of the current epoch's metrics so far, the spec, the run (batch,
epochs, schedule, data hash) and the sha256 of the train.onnx it belongs to, so `--resume` continues
exactly where it stopped. state.npz, the initial state compile writes, records that sha256 too.

Every load checks the arrays against the contract, and every load from a folder (train, resume, tune,
eval, export) checks the file belongs to that folder's compile: it records the folder's train.onnx. Two
compiles of one model can train tensors of the same shapes and dtypes on different grids (--bits,
--headroom), so the arrays alone cannot tell. A state.npz written before state files recorded their
compile passes when it is the initial state source.onnx gives on this compile's grid.
"""
from __future__ import annotations

import json
import math
import pathlib

import numpy as np

from fgcompile import modelio, npzfile, validate
from fgcompile.artifact import LAYOUT, Contract
from fgcompile.errors import ModelError

META = "__meta__"


def save(path, state: dict, meta: dict) -> None:
    modelio.save_npz(path, {**state, META: np.array(json.dumps(meta, sort_keys=True))})


def load(path, contract: Contract | None = None, train_sha256: str | None = None) -> tuple[dict, dict]:
    """(state, meta) of a checkpoint or state file; with `contract`, checked against it, and with
    `train_sha256` (a folder's file), refused unless it belongs to that train.onnx's compile."""
    path = pathlib.Path(path)
    fix = (f"Delete {path.name} and train again without --resume." if path.name != LAYOUT.state
           else f"Put back the {path.name} that compile wrote into {path.parent}, or recompile the model into it "
                f"(fgcompile compile MODEL.onnx -o {path.parent} --force).")
    names = [s.name for s in contract.state] if contract else []
    arrays = npzfile.read_npz(path, [], "checkpoint", fix, error=validate.StateError,
                              optional=[*names, META] if contract else None)
    meta = {"step": 0}
    if META in arrays:
        try:
            meta = json.loads(str(arrays.pop(META)))
        except ValueError:
            meta = None
        if not _meta_ok(meta):
            raise validate.StateError(f"{path}: its {META} record is unreadable. {fix}")
    if contract is not None:
        arrays = validate.check_state(arrays, contract, path, fix)
    if train_sha256:
        _check_compile(path, arrays, meta, contract, train_sha256, fix)
    return arrays, meta


def _check_compile(path: pathlib.Path, arrays: dict, meta: dict, contract: Contract | None, train_sha256: str,
                   fix: str) -> None:
    """StateError unless the file at PATH belongs to the compile whose train.onnx has `train_sha256`."""
    recorded = meta.get("train_sha256")
    if recorded == train_sha256:
        return
    if recorded is not None:
        raise validate.StateError(f"{path}: belongs to another compile (it records a different train.onnx); the "
                                  f"folder was recompiled, train.onnx edited, or the file copied from elsewhere. {fix}")
    if path.name != LAYOUT.state or contract is None:
        raise validate.StateError(f"{path}: records no train.onnx it belongs to (written by hand or by an older "
                                  f"fgcompile), so it may hold another compile's grid (--bits, --headroom). {fix}")
    try:   # an older fgcompile's state.npz: it must be the initial state of this folder's source.onnx
        validate.check_source(modelio.load_model(path.parent / LAYOUT.source), arrays, contract, path)
    except ModelError:
        raise validate.StateError(f"{path}: is not this folder's initial state (it records no train.onnx, and its "
                                  f"values are not {LAYOUT.source}'s on this compile's grid); it comes from another "
                                  f"compile. {fix}") from None


def _meta_ok(meta) -> bool:
    return (isinstance(meta, dict) and _count(meta.get("step")) and _count(meta.get("bad_steps", 0))
            and isinstance(meta.get("run"), (dict, type(None)))
            and isinstance(meta.get("train_sha256"), (str, type(None))) and _sums_ok(meta.get("epoch_sums")))


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _sums_ok(sums) -> bool:
    """The sums of the current epoch's metrics (steps, loss, accuracy); older checkpoints have none."""
    real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return sums is None or (isinstance(sums, dict) and _count(sums.get("steps")) and real(sums.get("loss"))
                            and real(sums.get("accuracy")))
