"""export: write the trained integer weights back into the original inference graph.

Widened tensors narrow back to their source grid:  W8 = clip(sign(W16)·((|W16| + 128) div 256), −128, 127)
(round half away from zero) with the source scale, so the exported model has the same nodes, ops and
dtypes as the input model. The report says how much rounding moved each tensor.
"""
from __future__ import annotations

import pathlib

import numpy as np
import onnx
from onnx import numpy_helper

from fgcompile import modelio
from fgcompile.compiler import SOURCE, TRAIN, read_contract
from fgcompile.errors import ModelError
from .session import make_session
from .trainer import latest_state

FACTOR = 256


def narrow(values: np.ndarray, dtype: str) -> np.ndarray:
    v = values.astype(np.int64)
    q = np.sign(v) * ((np.abs(v) + FACTOR // 2) // FACTOR)
    info = np.iinfo(dtype)
    return np.clip(q, info.min, info.max).astype(dtype)


def export_model(out_dir, path) -> dict:
    out = pathlib.Path(out_dir)
    if not (out / TRAIN).is_file() or not (out / SOURCE).is_file():
        raise ModelError(f"{out}: not a compiled folder (needs {TRAIN} and {SOURCE}). Run `fgcompile compile` first.")
    contract = read_contract(modelio.load_model(out / TRAIN))
    model = modelio.load_model(out / SOURCE)
    state = latest_state(out)
    inits = {i.name: i for i in model.graph.initializer}
    report = {}
    for s in contract["state"]:
        value = state[s["name"]]
        if s["widened"]:
            exported = narrow(value, s["source_dtype"])
            err = value.astype(np.int64) - exported.astype(np.int64) * FACTOR
            report[s["name"]] = {"narrowed": f"{s['dtype']}->{s['source_dtype']}",
                                 "max_rounding_lsb16": int(np.abs(err).max()),
                                 "mean_abs_rounding_lsb16": float(np.abs(err).mean()),
                                 "inexact_fraction": float((err != 0).mean())}
        else:
            exported = value.astype(s["source_dtype"])
            report[s["name"]] = {"narrowed": None}
        inits[s["name"]].CopyFrom(numpy_helper.from_array(exported, s["name"]))
    onnx.checker.check_model(model)
    make_session(model)  # the exported file must load in stock onnxruntime
    modelio.save_model(model, path)
    return report
