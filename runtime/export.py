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

from fgcompile import folder, modelio, validate
from fgcompile.compiler import SOURCE, STATE, TRAIN
from fgcompile.errors import ModelError
from . import checkpoint
from .trainer import latest_state, open_train_graph, session_of

FACTOR = 256


def narrow(values: np.ndarray, dtype: str) -> np.ndarray:
    v = values.astype(np.int64)
    q = np.sign(v) * ((np.abs(v) + FACTOR // 2) // FACTOR)
    info = np.iinfo(dtype)
    return np.clip(q, info.min, info.max).astype(dtype)


def export_model(out_dir, path) -> dict:
    """Write OUT's latest state into a copy of its source model at PATH. PATH must be a regular file (or
    new), not a file of OUT and not the model OUT was compiled from."""
    out, path = pathlib.Path(out_dir), pathlib.Path(path)
    folder.recover(out)
    if not (out / TRAIN).is_file() or not (out / SOURCE).is_file():
        raise ModelError(f"{out}: not a compiled folder (needs {TRAIN} and {SOURCE}). Run `fgcompile compile` first.")
    protected = {out: f"inside the compiled folder {out}"}
    if folder.marker(out).get("source"):
        protected[folder.marker(out)["source"]] = f"the model {out} was compiled from"
    modelio.check_output_file(path, protected)
    modelio.remove_stale_temps(path.parent)
    _, contract, _ = open_train_graph(out)
    model = modelio.load_model(out / SOURCE)
    initial, _ = checkpoint.load(out / STATE, contract)
    inits = validate.check_source(model, initial, contract, out / SOURCE)
    report = write_state(inits, contract, latest_state(out, contract))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{out / SOURCE}: the exported model fails onnx.checker ({str(exc).splitlines()[0]}). "
                         "Recompile the model.") from None
    session_of(model, path)  # the exported file must load in stock onnxruntime
    modelio.save_model(model, path)
    return report


def export_state(source: onnx.ModelProto, contract: dict, state: dict) -> tuple[onnx.ModelProto, dict]:
    """In memory: a copy of the source model with `state` written in, and the rounding report."""
    model = onnx.ModelProto()
    model.CopyFrom(source)
    inits = {i.name: i for i in model.graph.initializer}
    missing = [s["name"] for s in contract["state"] if s["name"] not in inits]
    if missing:
        raise ModelError(f"the source model has no initializer {missing[0]!r}: pass the model this training "
                         "graph was compiled from.")
    return model, write_state(inits, contract, state)


def write_state(inits: dict, contract: dict, state: dict) -> dict:
    """Write each trained tensor into its initializer (narrowed to the source dtype where widened)."""
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
    return report
