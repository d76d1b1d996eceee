"""finalize: set the graph's I/O, clean up, sort, export, record the contract, and verify.

Precondition: every tensor named in `inputs`/`outputs` exists in the graph.
Postcondition: a ModelProto with exactly those inputs and outputs, no dead nodes, topologically
sorted, shapes inferred, metadata_props["fgcompile"] = JSON contract; it passes onnx.checker (full
check) and onnxruntime session creation, else CompileError.
"""
from __future__ import annotations

import json

import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from fgcompile.errors import CompileError

IR_VERSION = 10


def run(graph: gs.Graph, inputs: list, outputs: list, contract: dict) -> onnx.ModelProto:
    graph.inputs, graph.outputs = list(inputs), list(outputs)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph)
    model.ir_version = IR_VERSION
    model.producer_name = "fgcompile"
    onnx.helper.set_model_props(model, {"fgcompile": json.dumps(contract, sort_keys=True)})
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CompileError(f"internal: the compiled {contract.get('format')} graph fails validation "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0]}). Please report it with "
                           "the model.") from None
    return model
