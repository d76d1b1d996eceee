"""quant_dtype: a QuantizeLinear's output type said once, by its zero point.

From opset 21 a QuantizeLinear may name its output type twice: by its zero point's dtype and by the
`output_dtype` attribute, which must then agree (converters of int8 TFLite models write both).
onnxruntime's QDQ S8→U8 rewrite (graph optimizations on) moves an int8 Q→DQ pair to uint8 by swapping
in a uint8 zero point, keeps the attribute, and the session fails type inference: "output_dtype INT8
does not match y_zero_point type UINT8". The rewrite takes a pair whose zero point is a constant
initializer read by one DQ. A source whose initializers are also graph inputs (overridable, so not
constant) escapes it; every graph compiled from that source does not.

The attribute beside a zero point says nothing the zero point does not, so it goes. A QuantizeLinear
without a zero point keeps it (there it picks the type, and the rewrite needs a zero point).

The same rewrite breaks a QuantizeLinear that onnxruntime's QDQ propagation inserts (with the attribute)
after a Reshape/Transpose/Unsqueeze that reads an int8 DQ and feeds no Q. The compiled graphs never hold
such a pair (passes/activations.py); a source at opset 21 that does cannot be loaded, and
`propagation_failure` names the node and the fix.

Precondition: a ModelProto.  Postcondition: no QuantizeLinear with a zero point has `output_dtype`, in
the main graph or a subgraph; the model computes the same function. `run` returns how many changed.
"""
from __future__ import annotations

import re

import onnx
import onnxruntime as ort

S8_TO_U8 = re.compile(r"Node \((.*?)\) Op \(QuantizeLinear\) \[TypeInferenceError\] output_dtype INT8 does not "
                      r"match y_zero_point type UINT8")


def run(model: onnx.ModelProto) -> int:
    changed = 0
    for node in _redundant(model.graph):
        kept = [a for a in node.attribute if a.name != "output_dtype"]
        del node.attribute[:]
        node.attribute.extend(kept)
        changed += 1
    return changed


def loadable(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` itself, or a copy rewritten by `run` when it holds such an attribute: what onnxruntime is
    asked to load when the pipeline checks the source, since canonicalize makes the same rewrite."""
    if next(_redundant(model.graph), None) is None:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    run(copy)
    return copy


def _redundant(graph: onnx.GraphProto):
    """The QuantizeLinear nodes of `graph` and its subgraphs that have a zero point and `output_dtype`."""
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx") and len(node.input) > 2 \
                and node.input[2] and any(a.name == "output_dtype" for a in node.attribute):
            yield node
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                        a.graphs if a.type == onnx.AttributeProto.GRAPHS else []):
                yield from _redundant(sub)


def propagation_failure(model: onnx.ModelProto, reason: str) -> str | None:
    """What to tell the user when onnxruntime failed to load `model` (a source, canonical already as to
    `output_dtype`) with `reason` because of a QuantizeLinear its QDQ propagation inserted; else None."""
    found = S8_TO_U8.search(reason)
    if found is None:
        return None
    tensor = found.group(1).removesuffix("_q")     # onnxruntime names the inserted node <tensor>_q
    node = next((n for n in model.graph.node if tensor in n.output), None)
    where = f"node {node.name!r} ({node.op_type})" if node is not None else f"tensor {tensor!r}"
    return (f"onnxruntime {ort.__version__}'s graph optimizer cannot load this model's int8 activations: after "
            f"{where}, which reads an int8 DequantizeLinear and is not quantized again, it inserts a QuantizeLinear "
            f"that its int8-to-uint8 rewrite then breaks ({found.group(0)}). The model is valid ONNX. Re-encode its "
            "int8 activations as uint8 with zero point + 128 (the same values), or add a QuantizeLinear/"
            "DequantizeLinear pair after that node, or export it at opset 20 or lower.")
