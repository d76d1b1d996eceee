"""compile_model: the public entry of the compiler, and the layout of a compiled output folder.

OUT/train.onnx   the training graph (its metadata_props hold the spec and the I/O contract)
OUT/eval.onnx    the inference graph with the trained tensors as inputs (for eval during training)
OUT/state.npz    the initial state: one array per trained tensor, named as the graph inputs
OUT/source.onnx  the inference model in canonical QDQ form (passes/canonicalize.py; the input model
                 itself when it already is): export writes the trained weights into a copy
OUT/tune.json    the learning rate `fgcompile tune` chose (runtime/tune.py), when it ran
OUT/.fgcompile-folder, .fgcompile.lock   the marker that fgcompile wrote OUT, and the lock of a run
Everything is built in memory first and the folder is swapped in whole, so a failed compile leaves
nothing behind and never a mix of two compilations; fgcompile/folder.py says which folders it replaces.
"""
from __future__ import annotations

import pathlib

import onnx

from fgcompile import folder, modelio
from fgcompile.passes.pipeline import Compiled, compile_graph
from fgcompile.spec import TrainSpec

TRAIN, EVAL, STATE, SOURCE, CHECKPOINT = "train.onnx", "eval.onnx", "state.npz", "source.onnx", "checkpoint.npz"


def compile_model(model, spec: TrainSpec | None = None, calibration=None) -> Compiled:
    """Compile a QDQ inference model (path or ModelProto) into a training graph and its initial state.
    `calibration`: float32 model inputs (e.g. the training data's x) for --precondition."""
    if not isinstance(model, onnx.ModelProto):
        model = modelio.load_model(model)
    return compile_graph(model, spec or TrainSpec(), calibration)


def write_compiled(compiled: Compiled, out_dir, force: bool = False, source_path=None) -> pathlib.Path:
    """Write the folder as a whole: build it beside OUT, then swap it in, so OUT is either the old
    folder or the complete new one (an old checkpoint, which would not match the new graph, goes).
    OUT must be new, empty or a compiled folder (one holding training only with force), and must not
    hold source_path, the file the model was read from."""
    out = pathlib.Path(out_dir)
    folder.recover(out)
    folder.check_replaceable(out, [source_path] if source_path else [], force)
    with folder.staged(out, "compiled", source_path) as staging:
        modelio.save_model(compiled.train, staging / TRAIN)
        modelio.save_model(compiled.eval, staging / EVAL)
        modelio.save_npz(staging / STATE, compiled.state)
        modelio.save_model(compiled.source, staging / SOURCE)
    return out


def read_contract(model: onnx.ModelProto, path="train.onnx") -> dict:
    """The contract of a training graph, checked against the graph (fgcompile/validate.py)."""
    from fgcompile.validate import parse_contract
    return parse_contract(model, path)
