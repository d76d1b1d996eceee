"""The one place that composes the passes from a TrainSpec.

    canonicalize → analyze → select → floatgrid → widen → precondition → lift → [eval graph] → prng → pair
    → loss → estimate → update → finalize

The model keeps its opset when it is at least BASE_OPSET (what the emitted ops need: BitwiseXor,
ReduceMean with an axes input); it is converted to WIDE_OPSET only when widen emits int16
DequantizeLinear.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from fgcompile import __version__, grid
from fgcompile.errors import CompileError, ModelError
from fgcompile.spec import TrainSpec
from . import analyze, canonicalize, estimate, finalize, floatgrid, lift, prompts, loss, pair, precondition, prng, select, update, widen
from .context import Context

BASE_OPSET = 18   # BitwiseXor/BitwiseAnd (prng), ReduceMean with axes as an input (loss)
WIDE_OPSET = 21   # int16 DequantizeLinear (widen)
TRAIN_FORMAT, EVAL_FORMAT = "fgcompile-train/1", "fgcompile-eval/1"


@dataclasses.dataclass
class Compiled:
    train: onnx.ModelProto
    eval: onnx.ModelProto
    state: dict[str, np.ndarray]
    contract: dict
    context: Context
    source: onnx.ModelProto   # the canonical inference model: export writes the trained tensors into it
    notes: list[str]          # what canonicalize rewrote


def _at_least(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The model itself when its opset is >= target, else converted to target."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version >= target:
        return model
    try:
        return onnx.version_converter.convert_version(model, target)
    except Exception as exc:
        raise CompileError(f"the model is opset {version} and could not be converted to opset "
                           f"{target} ({str(exc).splitlines()[0]}). Re-export it at opset {target}"
                           + (" or compile with --bits 8." if target == WIDE_OPSET else ".")) from None


MIN_OPSET = 13  # per-channel QDQ (DequantizeLinear axis) arrived in opset 13


def check_source(model: onnx.ModelProto) -> None:
    """Refuse what no pass should see: an opset outside what we and onnxruntime support, an invalid
    graph, or one onnxruntime cannot load (the compiled graph would fail the same way)."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version < MIN_OPSET:
        raise ModelError(f"the model is opset {version}; QDQ quantization needs opset >= {MIN_OPSET}. "
                         "Re-export it at opset 21.")
    if version > onnx.defs.onnx_opset_version():
        raise ModelError(f"the model is opset {version}, newer than this onnx supports "
                         f"({onnx.defs.onnx_opset_version()}). Re-export it at opset 21.")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"the input model fails onnx.checker ({str(exc).splitlines()[0]}); fix or re-export "
                         "it before compiling.") from None
    try:
        ort.InferenceSession(model.SerializeToString(), _quiet(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        reason = str(exc).split(" : ")[-1].splitlines()[0][:300]
        raise ModelError(f"onnxruntime {ort.__version__} cannot load the input model ({reason}). Re-export "
                         "it at opset 21 with ops onnxruntime supports.") from None


def _quiet() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return opts


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Intermediate ranks let pair stack the branches (passes/stack.py); without them it clones."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:
        return model


def _resolution_bits(ctx: Context) -> int:
    """Bits of the training grid per source range: source bits + log2(widening factor) (16 without weights)."""
    return grid.resolution_bits([t.contract() for t in ctx.trainables])


def _calibration(spec: TrainSpec, calibration) -> np.ndarray | None:
    if spec.precondition == "whiten" and calibration is None:
        raise CompileError("--precondition whiten needs calibration inputs: pass --calibration DATA.npz "
                           "(e.g. the training data), or --precondition none.")
    return None if spec.precondition == "none" or calibration is None else np.asarray(calibration, np.float32)


def compile_graph(model: onnx.ModelProto, spec: TrainSpec, calibration=None) -> Compiled:
    """`calibration`: float32 inputs [N, ...] (no labels) for preconditioning; frozen at compile time."""
    check_source(model)
    source, notes = canonicalize.run(model)
    if spec.prompts:
        source = prompts.run(source, spec.prompts, spec.prompt_at, spec.seed)
        notes.append(f"{spec.prompts} prompt tokens appended (initializer {prompts.PROMPT!r})")
    graph = gs.import_onnx(_with_shapes(_at_least(source, BASE_OPSET)))
    ctx = Context(spec, calibration=_calibration(spec, calibration))
    for p in (analyze, select, floatgrid):
        graph = p.run(graph, ctx)
    gridded = [t.name for t in ctx.trainables if t.tensor.float_grid is not None]
    if gridded:
        source = floatgrid.apply(source, gridded)
    if widen.needed(ctx) and graph.opset < WIDE_OPSET:
        graph = gs.import_onnx(_with_shapes(_at_least(gs.export_onnx(graph), WIDE_OPSET)))
    for p in (widen, precondition):
        graph = p.run(graph, ctx)
    ctx.spec = spec = dataclasses.replace(spec.resolve(_resolution_bits(ctx)),
                                          precondition="whiten" if ctx.preconditioned else "none")
    graph, state = lift.run(graph, ctx)
    data = [graph.tensors()[name] for name in ctx.data_inputs]
    state_in = [ctx.state_in[t.name] for t in ctx.trainables]

    eval_graph = graph.copy()
    eval_tensors = eval_graph.tensors()
    eval_contract = {"format": EVAL_FORMAT, "version": __version__, "data": ctx.data_input,
                     "data_inputs": ctx.data_inputs, "output": ctx.output,
                     "state": [t.name for t in ctx.trainables]}
    eval_model = finalize.run(eval_graph, [eval_tensors[n] for n in ctx.data_inputs] + [eval_tensors[t.name] for t in
                                                                                     ctx.trainables],
                              [eval_tensors[ctx.output]], eval_contract)

    for p in (prng, pair, loss, estimate, update):
        graph = p.run(graph, ctx)
    contract = {
        "format": TRAIN_FORMAT, "version": __version__, "spec": dataclasses.asdict(spec),
        "inputs": {"data": ctx.data_input, "labels": "labels", "seed": "seed", "step": "step", "lr": "lr"},
        "data_inputs": ctx.data_inputs,   # every data input; inputs.data is the first
        "stream": prng.STREAM,
        "outputs": {"loss": "loss", "accuracy": "accuracy", "loss_plus": "loss_plus",
                    "loss_minus": "loss_minus"},
        "state": [t.contract() for t in ctx.trainables],
        "lr": {"shift": spec.lr_shift, "default": spec.lr_numerator, "max": ctx.lr_max},
        "model_output": ctx.output,
        "loss_tap": ctx.loss_tap,
        "branches": ctx.branches,
        "branches_reason": ctx.branches_reason,
        "tie_tolerance": estimate.TIE_TOLERANCE,
        # internal tensors a conformance check compares across runtimes (`fgcompile verify`)
        "probes": {"coefficients": ctx.coefficients.name, "z": [ctx.z[t.name].name for t in ctx.trainables]},
        "precondition": ctx.preconditioned,
    }
    inputs = data + [ctx.labels, ctx.seed, ctx.step, ctx.lr] + state_in
    outputs = ctx.extra_outputs + [ctx.loss_plus, ctx.loss_minus] + [ctx.state_out[t.name] for t in ctx.trainables]
    train_model = finalize.run(graph, inputs, outputs, contract)
    return Compiled(train_model, eval_model, state, contract, ctx, source, notes)
