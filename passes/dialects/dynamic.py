"""dynamic: quantize_dynamic's integer products become QDQ weight sites, the activation stays dynamic.

    Cast(MatMulInteger(a, W, zp_a, zp_W), float)  →  MatMul(DQ(a, 1, zp_a), DQ(W, 1, zp_W))
    Cast(ConvInteger(x, W, zp_x, zp_W), float)    →  Conv(DQ(x, 1, zp_x), DQ(W, 1, zp_W))

The scales stay where quantize_dynamic put them (the Mul by s_a·s_W after the Cast), so the weight's DQ
has scale 1: its grid step is one integer unit, as in the source. DQ with scale 1 yields the integers
exactly, and a float32 sum of integer products is exact while every partial sum stays below 2^24
(|a − zp_a| ≤ 255, |W − zp_W| ≤ 255): always for K·255² < 2^24 (K ≤ 258), and in practice far beyond,
since activations and weights rarely sit at both extremes. onnxruntime may also fuse the DQ pair back into
an integer kernel (MatMulIntegerToFloat), which is exact.

Precondition: any graph.  Postcondition: every MatMulInteger/ConvInteger whose weight (input 1) is an
initializer and whose only consumer is a Cast to float is replaced, with that Cast, by the float op on
two scale-1 DequantizeLinear nodes writing the Cast's output. Returns how many were converted.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph_ops import Builder, optional_input as _given

FLOAT_OP = {"MatMulInteger": "MatMul", "ConvInteger": "Conv"}


def _unit_dq(b: Builder, x, zp, axis: int):
    """DQ(x, 1, zp): zp may be per channel (quantize_dynamic's per_channel), scale then matches it."""
    per_channel = isinstance(zp, gs.Constant) and zp.values.size > 1
    ones = np.ones(zp.values.shape, np.float32) if per_channel else np.float32(1.0)
    ins = [x, b.const(ones, "unit_scale")] + ([zp] if zp is not None else [])
    return b.op("DequantizeLinear", ins, {"axis": axis} if per_channel else {}, dtype=np.float32, hint="dq")


def run(graph: gs.Graph) -> int:
    converted = 0
    for node in list(graph.nodes):
        if node.op not in FLOAT_OP or not isinstance(node.inputs[1], gs.Constant):
            continue
        users = node.outputs[0].outputs
        if len(users) != 1 or users[0].op != "Cast" or users[0].attrs.get("to") != onnx.TensorProto.FLOAT:
            continue
        cast, b = users[0], Builder(graph, f"{node.name}/qdq")
        a = _unit_dq(b, node.inputs[0], _given(node, 2), 1)
        w = _unit_dq(b, node.inputs[1], _given(node, 3), -1 if node.op == "MatMulInteger" else 0)
        attrs = {k: v for k, v in node.attrs.items()} if node.op == "ConvInteger" else {}
        out = cast.outputs[0]
        cast.outputs, node.outputs = [], []
        graph.nodes.append(gs.Node(FLOAT_OP[node.op], node.name, attrs, [a, w], [out]))
        converted += 1
    graph.cleanup()
    return converted
