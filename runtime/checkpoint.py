"""Checkpoints: the training state plus where training stands, written atomically.

A checkpoint is an .npz: one array per state tensor (named as the graph inputs) and `__meta__`, a JSON
string with step, epoch, bad_steps and the spec, so `--resume` continues exactly where it stopped.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from fgcompile import modelio
from fgcompile.errors import DataError

META = "__meta__"


def save(path, state: dict, meta: dict) -> None:
    modelio.save_npz(path, {**state, META: np.array(json.dumps(meta, sort_keys=True))})


def load(path) -> tuple[dict, dict]:
    path = pathlib.Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:
        raise DataError(f"{path}: unreadable checkpoint ({exc}). Delete it and train without --resume.") from None
    meta = json.loads(str(arrays.pop(META))) if META in arrays else {"step": 0}
    return arrays, meta
