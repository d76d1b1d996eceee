"""compile_model: the public entry of the compiler, and write_compiled, which writes its result as a
folder (fgcompile/artifact.py gives the layout).

Everything is built in memory first and the folder is swapped in whole, so a failed compile leaves
nothing behind and never a mix of two compilations; fgcompile/folder.py says which folders it replaces.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np
import onnx

from fgcompile import folder, modelio, validate
from fgcompile.artifact import LAYOUT, Compiled
from fgcompile.errors import ModelError, wrong_type
from fgcompile.passes.pipeline import compile_graph
from fgcompile.runtime import checkpoint, data
from fgcompile.spec import TrainSpec


def compile_model(model, spec: TrainSpec | None = None, calibration=None) -> Compiled:
    """Compile a QDQ inference model (path or ModelProto) into a training graph and its initial state.
    `calibration`: float32 model inputs (e.g. the training data's x) for --precondition. `spec` may
    be a dict of TrainSpec's fields."""
    if not isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        raise wrong_type("compile_model(model=…)", "the path of an .onnx file or an onnx.ModelProto", model,
                         ModelError)
    spec = TrainSpec.of(spec, "compile_model(spec=…)")
    if calibration is not None and not isinstance(calibration, np.ndarray):
        raise wrong_type("compile_model(calibration=…)", "float32 model inputs as a numpy array (e.g. the "
                         "training data's x; fgcompile.runtime.data.load_data reads an .npz)", calibration)
    if not isinstance(model, onnx.ModelProto):
        model = modelio.load_model(model)
    if calibration is not None:   # before any pass: a wrong shape would fail inside precondition's session
        data.check_calibration("calibration inputs", calibration, data.model_input(model))
    return compile_graph(model, spec, calibration)


def write_compiled(compiled: Compiled, out_dir, force: bool = False, source_path=None,
                   own_training: bool = False) -> pathlib.Path:
    """Write the folder as a whole: build it beside OUT, then swap it in, so OUT is either the old
    folder or the complete new one (an old checkpoint, which would not match the new graph, goes).
    OUT must be new, empty or a compiled folder (one holding training only with force or own_training,
    one holding files fgcompile did not write only with force), and must not
    hold source_path, the file the model was read from."""
    if not isinstance(compiled, Compiled):
        raise wrong_type("write_compiled(compiled=…)", "compile_model's result", compiled)
    if not isinstance(out_dir, (str, os.PathLike)):
        raise wrong_type("write_compiled(out_dir=…)", "the path of the folder to write", out_dir)
    out = pathlib.Path(out_dir)
    folder.recover(out)
    folder.check_replaceable(out, [source_path] if source_path else [], force, own_training=own_training)
    # a full disk names the folder and what all of it needs, not the one file that found the disk full
    with modelio.space_for(out, _size(compiled)), folder.staged(out, "compiled", source_path) as staging:
        modelio.save_model(compiled.train, staging / LAYOUT.train)
        modelio.save_model(compiled.eval, staging / LAYOUT.eval)
        # the state records its train.onnx as a checkpoint does: another compile's is refused on load
        checkpoint.save(staging / LAYOUT.state, compiled.state,
                        {"step": 0, "train_sha256": validate.file_sha256(staging / LAYOUT.train)})
        modelio.save_model(compiled.source, staging / LAYOUT.source)
    return out


def _size(compiled: Compiled) -> int:
    """The bytes the folder's files take (the .npz headers aside)."""
    return sum(m.ByteSize() for m in (compiled.train, compiled.eval, compiled.source)) + \
        sum(a.nbytes for a in compiled.state.values())
