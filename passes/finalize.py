"""finalize: set the graph's I/O, clean up, sort, export, record the contract, and verify.

Precondition: ctx.contract and the tensors the passes added (the I/O below) exist in the graph.
Postcondition: ctx.train_model (also returned) is a ModelProto with inputs data, labels, seed, step, lr,
state and outputs loss, accuracy, loss_plus, loss_minus, next state; no dead nodes, topologically
sorted, shapes inferred, metadata_props["fgcompile"] = JSON contract; it passes onnx.checker (full
check) and onnxruntime session creation, else CompileError. `to_model` does the same for any I/O.
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from fgcompile.artifact import METADATA_KEY, Contract, EvalContract
from fgcompile.errors import CompileError
from fgcompile import modelio
from fgcompile.session import make_session
from .context import Context, Pass

IR_VERSION = 10


def to_model(graph: gs.Graph, inputs: list, outputs: list, contract: Contract | EvalContract) -> onnx.ModelProto:
    graph.inputs, graph.outputs = list(inputs), list(outputs)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph)
    model.ir_version = IR_VERSION
    model.producer_name = "fgcompile"
    onnx.helper.set_model_props(model, {METADATA_KEY: contract.to_json()})
    size = model.ByteSize()
    if size > modelio.PROTOBUF_LIMIT:   # else onnx.checker fails with "Failed to serialize proto"
        raise CompileError(f"the compiled {contract.format} graph would be {size / 2 ** 30:.2f} GiB, over the 2 GiB "
                           "limit of an ONNX protobuf. Train fewer or smaller tensors (--last, --train) or compile "
                           "a smaller model.")
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
        make_session(model)
    except Exception as exc:
        raise CompileError(f"internal: the compiled {contract.format} graph fails validation "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0]}). Please report it with "
                           "the model.") from None
    return model


def run(graph: gs.Graph, ctx: Context) -> onnx.ModelProto:
    tensors = graph.tensors()
    names = [t.name for t in ctx.trainables]
    perturbations, losses = ctx.perturbations, ctx.losses
    inputs = [tensors[n] for n in ctx.io.data_inputs] + [losses.labels, perturbations.seed, perturbations.step,
                                                         ctx.update.lr_numerator] + [ctx.state.inputs[n] for n in names]
    outputs = losses.metrics + [losses.plus, losses.minus] + [ctx.update.state_out[n] for n in names]
    inputs += list(ctx.buffers.inputs.values())      # training buffers after the parameters, as in the
    outputs += list(ctx.buffers.outputs.values())    # contract's state
    ctx.train_model = to_model(graph, inputs, outputs, ctx.contract)
    return ctx.train_model


PASS = Pass("finalize", run, reads=("io", "trainables", "state", "perturbations", "losses", "update", "buffers",
                                   "contract"), adds=("train_model",))
