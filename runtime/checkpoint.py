"""Checkpoints: the training state plus where training stands, written atomically.

A checkpoint is an .npz: one array per state tensor (named as the graph inputs) and `__meta__`, a JSON
string with step, epoch, bad_steps, the spec, the run (batch, epochs, schedule, data hash) and the
sha256 of the train.onnx it belongs to, so `--resume` continues exactly where it stopped and a
checkpoint of another compile is refused. Every load checks the arrays against the contract.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from fgcompile import modelio, npzfile, validate
from fgcompile.artifact import LAYOUT, Contract

META = "__meta__"


def save(path, state: dict, meta: dict) -> None:
    modelio.save_npz(path, {**state, META: np.array(json.dumps(meta, sort_keys=True))})


def load(path, contract: Contract | None = None, train_sha256: str | None = None) -> tuple[dict, dict]:
    """(state, meta) of a checkpoint or state file; with `contract`, checked against it, and with
    `train_sha256`, refused if the checkpoint records another train.onnx."""
    path = pathlib.Path(path)
    fix = (f"Delete {path.name} and train again without --resume." if path.name != LAYOUT.state
           else "Recompile the model into this folder (fgcompile compile MODEL.onnx -o FOLDER --force).")
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
    if train_sha256 and meta.get("train_sha256") not in (None, train_sha256):
        raise validate.StateError(f"{path}: belongs to another compile (it records a different train.onnx); "
                                  f"the folder was recompiled or the file copied from elsewhere. {fix}")
    return arrays, meta


def _meta_ok(meta) -> bool:
    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    return (isinstance(meta, dict) and count(meta.get("step")) and count(meta.get("bad_steps", 0))
            and isinstance(meta.get("run"), (dict, type(None)))
            and isinstance(meta.get("train_sha256"), (str, type(None))))
