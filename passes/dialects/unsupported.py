"""unsupported: say why a product (Conv, Gemm, MatMul, or a leftover integer or QOperator one) is not a
weight site, and why a graph has none.

`reasons` classifies each product that analyze did not take by what feeds its weight input; `inspect`
lists every one of them with its reason, and `explain` (analyze's refusal when there is no site at all)
counts each pattern, names one example and the export to use.

Precondition: a canonicalized gs.Graph (passes/canonicalize.py ran: Constant-node and Identity-read
weights are initializers, foldable fake-quant weights are folded).  Postcondition: the graph is
unchanged; `reasons` returns (node, pattern, detail) per product that is not a site, `explain` one
paragraph.
"""
from __future__ import annotations

import collections

import onnx_graphsurgeon as gs

from .fakequant import unfoldable

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
INTEGER_OPS = ("MatMulInteger", "ConvInteger")
QDQ_FIX = ("Quantize the weights: onnxruntime.quantization.quantize_static(..., quant_format=QuantFormat.QDQ), "
           "or export with weight quantizers enabled so that each weight is an integer initializer read by "
           "DequantizeLinear (or a float32 initializer followed by QuantizeLinear → DequantizeLinear).")
PATTERNS = {
    "float": "weights are float initializers with no QuantizeLinear (activations only are quantized)",
    "through": "weights pass through other ops between DequantizeLinear and the product (export the "
               "weight already transposed/reshaped, so that DequantizeLinear feeds the product directly)",
    "computed": "weights are computed in the graph, not stored as initializers",
    "grid": "weights are stored on a grid fgcompile does not train",
    "integer": "weights are integers consumed by MatMulInteger/ConvInteger without the Cast to float "
               "that quantize_dynamic writes",
    "qoperator": "weights sit inside QOperator nodes that could not be rewritten as QDQ exactly",
    "q_unfolded": "weights go through a QuantizeLinear that cannot be folded",
    "weight_first": "the constant operand is the first input (W·x); fgcompile trains the second (export x·Wᵀ, "
                    "e.g. Gemm with transB=1)",
    "activations": "both inputs are computed from the data, so there is no weight to train (e.g. attention's Q·Kᵀ)",
}


def _constant(t: gs.Tensor, depth: int = 8) -> bool:
    if isinstance(t, gs.Constant):
        return True
    if not t.inputs or depth == 0 or t.inputs[0].op == "DynamicQuantizeLinear":
        return False
    return all(_constant(i, depth - 1) for i in t.inputs[0].inputs if i.name)


def _dequantized(dq: gs.Node) -> tuple[str, str]:
    """What a DequantizeLinear feeding a product reads, when analyze did not take it."""
    x = dq.inputs[0]
    if isinstance(x, gs.Constant):
        return "grid", f"{x.values.dtype.name} in {x.name!r}"
    q = x.inputs[0] if x.inputs else None
    if q is not None and q.op == "QuantizeLinear":
        return "q_unfolded", unfoldable(q) or ""
    return "computed", ""


def _classify(node: gs.Node) -> tuple[str, str] | None:
    """(pattern, detail) of a product that analyze did not take as a site, else None (not a product)."""
    if node.op in INTEGER_OPS:
        return ("integer", "") if _constant(node.inputs[1]) else ("activations", "")
    if node.op.startswith("QLinear") or node.op == "QGemm":
        return ("qoperator", "") if len(node.inputs) > 3 and _constant(node.inputs[3]) else ("activations", "")
    if node.op not in WEIGHT_OPS or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    if not _constant(w):
        return ("weight_first", "") if _constant(node.inputs[0]) else ("activations", "")
    if isinstance(w, gs.Constant):
        return "float", "" if w.values.dtype.name == "float32" else w.values.dtype.name
    if w.inputs[0].op == "DequantizeLinear":
        return _dequantized(w.inputs[0])
    ops = []
    while w.inputs and w.inputs[0].op != "DequantizeLinear" and len(ops) < 8:
        ops.append(w.inputs[0].op)
        w = w.inputs[0].inputs[0]
    return ("through", " → ".join(reversed(ops))) if w.inputs else ("computed", "")


def reasons(graph: gs.Graph, sites=()) -> list[tuple[gs.Node, str, str]]:
    """(node, pattern, detail) for each product of `graph` that is not among `sites` (WeightSites)."""
    taken = {s.name for s in sites}
    found = [(node, _classify(node)) for node in graph.nodes if node.name not in taken]
    return [(node, *kind) for node, kind in found if kind is not None]


def describe(pattern: str, detail: str) -> str:
    return PATTERNS[pattern] + (f" ({detail})" if detail else "")


def explain(graph: gs.Graph) -> str:
    found = collections.defaultdict(list)
    for node, pattern, detail in reasons(graph):
        if pattern != "activations":
            found[describe(pattern, detail)].append(node.name)
    if not found:
        return ("no weight sites: no Conv, Gemm or MatMul reads constant weights (the model has no trainable "
                "layer fgcompile recognizes). " + QDQ_FIX)
    parts = [f"{what} ({len(v)} nodes, e.g. {v[0]!r})" for what, v in found.items()]
    return "no weight sites: " + "; ".join(parts) + ". " + QDQ_FIX
