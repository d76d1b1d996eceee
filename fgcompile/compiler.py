"""compile_model: the public entry of the compiler, and the layout of a compiled output folder.

OUT/train.onnx   the training graph (its metadata_props hold the spec and the I/O contract)
OUT/eval.onnx    the inference graph with the trained tensors as inputs (for eval during training)
OUT/state.npz    the initial state: one array per trained tensor, named as the graph inputs
OUT/source.onnx  the original inference model (export writes the trained weights into a copy)
Everything is built in memory first and each file is written atomically, so a failed compile leaves
nothing behind.
"""
from __future__ import annotations

import json
import pathlib

import onnx

from fgcompile import modelio
from fgcompile.passes.pipeline import Compiled, compile_graph
from fgcompile.spec import TrainSpec

TRAIN, EVAL, STATE, SOURCE, CHECKPOINT = "train.onnx", "eval.onnx", "state.npz", "source.onnx", "checkpoint.npz"


def compile_model(model, spec: TrainSpec | None = None) -> Compiled:
    """Compile a QDQ inference model (path or ModelProto) into a training graph and its initial state."""
    if not isinstance(model, onnx.ModelProto):
        model = modelio.load_model(model)
    return compile_graph(model, spec or TrainSpec())


def write_compiled(compiled: Compiled, source: onnx.ModelProto, out_dir) -> pathlib.Path:
    out = pathlib.Path(out_dir)
    modelio.save_model(compiled.train, out / TRAIN)
    modelio.save_model(compiled.eval, out / EVAL)
    modelio.save_npz(out / STATE, compiled.state)
    modelio.save_model(source, out / SOURCE)
    stale = out / CHECKPOINT  # a checkpoint of an earlier compile would not match this graph
    if stale.exists():
        stale.unlink()
    return out


def read_contract(model: onnx.ModelProto) -> dict:
    props = {p.key: p.value for p in model.metadata_props}
    if "fgcompile" not in props:
        from fgcompile.errors import ModelError
        raise ModelError("this ONNX file has no fgcompile contract in its metadata; pass the folder "
                         "written by `fgcompile compile`.")
    return json.loads(props["fgcompile"])
