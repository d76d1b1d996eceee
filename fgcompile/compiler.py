"""compile_model: the public entry of the compiler, and the layout of a compiled output folder.

OUT/train.onnx   the training graph (its metadata_props hold the spec and the I/O contract)
OUT/eval.onnx    the inference graph with the trained tensors as inputs (for eval during training)
OUT/state.npz    the initial state: one array per trained tensor, named as the graph inputs
OUT/source.onnx  the inference model in canonical QDQ form (passes/canonicalize.py; the input model
                 itself when it already is): export writes the trained weights into a copy
Everything is built in memory first and the folder is swapped in whole, so a failed compile leaves
nothing behind and never a mix of two compilations.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import onnx

from fgcompile import modelio
from fgcompile.errors import ModelError, OutputError
from fgcompile.passes.pipeline import Compiled, compile_graph
from fgcompile.spec import TrainSpec

TRAIN, EVAL, STATE, SOURCE, CHECKPOINT = "train.onnx", "eval.onnx", "state.npz", "source.onnx", "checkpoint.npz"


def compile_model(model, spec: TrainSpec | None = None) -> Compiled:
    """Compile a QDQ inference model (path or ModelProto) into a training graph and its initial state."""
    if not isinstance(model, onnx.ModelProto):
        model = modelio.load_model(model)
    return compile_graph(model, spec or TrainSpec())


def write_compiled(compiled: Compiled, out_dir) -> pathlib.Path:
    """Write the folder as a whole: build it beside OUT, then swap it in, so OUT is either the old
    folder or the complete new one (an old checkpoint, which would not match the new graph, goes)."""
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder. Choose another -o.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        staging.chmod(modelio.default_mode(directory=True))
    except OSError as exc:
        raise OutputError(f"{out}: cannot write here ({exc.strerror}). Choose a writable folder with -o.") from None
    try:
        modelio.save_model(compiled.train, staging / TRAIN)
        modelio.save_model(compiled.eval, staging / EVAL)
        modelio.save_npz(staging / STATE, compiled.state)
        modelio.save_model(compiled.source, staging / SOURCE)
        if out.exists():
            retired = out.with_name(f".{out.name}.old.{os.getpid()}")
            os.replace(out, retired)
            os.replace(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def read_contract(model: onnx.ModelProto) -> dict:
    props = {p.key: p.value for p in model.metadata_props}
    if "fgcompile" not in props:
        raise ModelError("this ONNX file has no fgcompile contract in its metadata; pass the folder "
                         "written by `fgcompile compile`.")
    return json.loads(props["fgcompile"])
