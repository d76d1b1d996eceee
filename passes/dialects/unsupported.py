"""unsupported: name the weight pattern of a graph in which analyze found no weight site.

Each Conv/Gemm/MatMul (and leftover integer or QOperator product) whose weight input is constant data is
classified by what feeds it; the message counts each pattern, names one example and the export to use.

Precondition: a canonicalized gs.Graph (passes/canonicalize.py ran).  Postcondition: the graph is
unchanged; returns one paragraph.
"""
from __future__ import annotations

import collections

import onnx_graphsurgeon as gs

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
QDQ_FIX = ("Quantize the weights: onnxruntime.quantization.quantize_static(..., quant_format=QuantFormat.QDQ), "
           "or export with weight quantizers enabled so that each weight is an integer initializer read by "
           "DequantizeLinear (or a float initializer followed by QuantizeLinear → DequantizeLinear).")
PATTERNS = {
    "float": "weights are float initializers with no QuantizeLinear (activations only are quantized)",
    "through": "weights pass through other ops between DequantizeLinear and the product (export the "
               "weight already transposed/reshaped, so that DequantizeLinear feeds the product directly)",
    "computed": "weights are computed in the graph, not stored as initializers",
    "integer": "weights are integers consumed by MatMulInteger/ConvInteger without the Cast to float "
               "that quantize_dynamic writes",
    "qoperator": "weights sit inside QOperator nodes that could not be rewritten as QDQ exactly",
    "q_unfolded": "weights go through a QuantizeLinear that cannot be folded (block or float8 quantization)",
}


def _constant(t: gs.Tensor, depth: int = 8) -> bool:
    if isinstance(t, gs.Constant):
        return True
    if not t.inputs or depth == 0 or t.inputs[0].op == "DynamicQuantizeLinear":
        return False
    return all(_constant(i, depth - 1) for i in t.inputs[0].inputs if i.name)


def _classify(node: gs.Node) -> str | None:
    if node.op in ("MatMulInteger", "ConvInteger"):
        return "integer" if isinstance(node.inputs[1], gs.Constant) else None
    if node.op.startswith("QLinear") or node.op == "QGemm":
        return "qoperator" if len(node.inputs) > 3 and isinstance(node.inputs[3], gs.Constant) else None
    if node.op not in WEIGHT_OPS or len(node.inputs) < 2 or not _constant(node.inputs[1]):
        return None
    w = node.inputs[1]
    if isinstance(w, gs.Constant):
        return "float"
    producer = w.inputs[0]
    if producer.op == "DequantizeLinear":
        q = producer.inputs[0]
        return "q_unfolded" if q.inputs and q.inputs[0].op == "QuantizeLinear" else "computed"
    ops = set()
    while w.inputs and w.inputs[0].op != "DequantizeLinear" and len(ops) < 8:
        ops.add(w.inputs[0].op)
        w = w.inputs[0].inputs[0]
    return "through" if w.inputs else "computed"


def explain(graph: gs.Graph) -> str:
    found = collections.defaultdict(list)
    for node in graph.nodes:
        kind = _classify(node)
        if kind:
            found[kind].append(node.name)
    if not found:
        return ("no weight sites: no Conv, Gemm or MatMul reads constant weights (the model has no trainable "
                "layer fgcompile recognizes). " + QDQ_FIX)
    parts = [f"{PATTERNS[k]} ({len(v)} nodes, e.g. {v[0]!r})" for k, v in found.items()]
    return "no weight sites: " + "; ".join(parts) + ". " + QDQ_FIX
