"""qoperator: QOperator nodes (QLinearConv, QLinearMatMul, QGemm, QLinearAdd, …) become QDQ.

    QLinearOp(x, s_x, zp_x, w, s_w, zp_w, …, s_y, zp_y)  →  Q(Op(DQ(x, s_x, zp_x), DQ(w, s_w, zp_w), …), s_y, zp_y)
    int32 bias B of QLinearConv/QGemm  →  DQ(B, s_x·s_w, 0)  (its documented scale)

onnxruntime fuses DQ → Op → Q back into the same QLinear kernel, so the canonical model runs the same
integer arithmetic as the source (tests/passes/test_dialects.py compares outputs bit for bit). Without
that fusion the float path can round a requantized output one LSB differently.

Precondition: any graph.  Postcondition: every node in RULES with constant per-tensor/per-channel
quantization parameters is replaced by DequantizeLinear → float op → QuantizeLinear writing the same
output tensor; weights keep their initializer name and values. Nodes it cannot convert exactly (QGemm
with alpha ≠ 1, a pre-13 QLinearSoftmax, channels-last pooling) stay and are named in the return value.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from ..graph_ops import Builder, optional_input as _given


@dataclasses.dataclass
class Rule:
    op: str                     # the float op
    triples: tuple[int, ...]    # input positions of (x, scale, zero point) triples, in the float op's order
    out: tuple[int, int] | None  # (scale, zero point) positions of the output, None for a float output
    keep: tuple[str, ...] = ()  # attributes the float op takes over
    weight: int | None = None   # which triple (by order) is the weight, for its per-channel axis
    bias: int | None = None     # position of an int32 bias with scale s_x·s_w


_CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")
_POOL_ATTRS = ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides")
RULES = {
    "QLinearConv": Rule("Conv", (0, 3), (6, 7), _CONV_ATTRS, weight=1, bias=8),
    "QLinearMatMul": Rule("MatMul", (0, 3), (6, 7), weight=1),
    "QGemm": Rule("Gemm", (0, 3), (7, 8), ("transA", "transB"), weight=1, bias=6),
    "QLinearAdd": Rule("Add", (0, 3), (6, 7)),
    "QLinearMul": Rule("Mul", (0, 3), (6, 7)),
    "QLinearSigmoid": Rule("Sigmoid", (0,), (3, 4)),
    "QLinearLeakyRelu": Rule("LeakyRelu", (0,), (3, 4), ("alpha",)),
    "QLinearSoftmax": Rule("Softmax", (0,), (3, 4), ("axis",)),
    "QLinearGlobalAveragePool": Rule("GlobalAveragePool", (0,), (3, 4)),
    "QLinearAveragePool": Rule("AveragePool", (0,), (3, 4), _POOL_ATTRS),
}


def _weight_axis(node: gs.Node, rule: Rule) -> int:
    if rule.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    if rule.op == "MatMul":
        return -1  # per-column scales of B [.., K, N]
    return 0       # Conv: per output channel


def _dq(b: Builder, x, scale, zp, axis=None):
    ins = [x, scale] + ([zp] if zp is not None else [])
    per_channel = isinstance(scale, gs.Constant) and scale.values.size > 1
    return b.op("DequantizeLinear", ins, {"axis": axis} if per_channel and axis is not None else {},
                dtype=np.float32, hint="dq")


def _why_not(node: gs.Node, rule: Rule) -> str | None:
    params = [_given(node, k + j) for k in rule.triples for j in (1, 2)]
    if rule.out:
        params += [_given(node, k) for k in rule.out]
    if any(p is not None and not isinstance(p, gs.Constant) for p in params):
        return "computed quantization parameters"
    if node.op == "QGemm" and float(node.attrs.get("alpha", 1.0)) != 1.0:
        return "alpha != 1"
    if node.op == "QLinearSoftmax" and int(node.attrs.get("opset", 13)) < 13:
        return "pre-13 Softmax semantics"
    if node.attrs.get("channels_last", 0):
        return "channels_last"
    return None


def _convert(graph: gs.Graph, b: Builder, node: gs.Node, rule: Rule) -> None:
    ins = []
    for order, k in enumerate(rule.triples):
        axis = _weight_axis(node, rule) if order == rule.weight else None
        ins.append(_dq(b, node.inputs[k], node.inputs[k + 1], _given(node, k + 2), axis))
    bias = _given(node, rule.bias) if rule.bias is not None else None
    if bias is not None:
        s_x, s_w = (node.inputs[k + 1].values for k in rule.triples[:2])
        scale = gs.Constant(b.name("bias_scale"), np.asarray(np.float32(s_x) * s_w.astype(np.float32)))
        ins.append(_dq(b, bias, scale, None, 0))
    attrs = {k: v for k, v in node.attrs.items() if k in rule.keep}
    out = node.outputs[0]
    if rule.out is None or _given(node, rule.out[0]) is None:  # float output (QGemm without y_scale)
        node.outputs = []
        graph.nodes.append(gs.Node(rule.op, b.name(rule.op.lower()), attrs, ins, [out]))
        return
    y = b.op(rule.op, ins, attrs, dtype=np.float32)
    s_y, zp_y = node.inputs[rule.out[0]], _given(node, rule.out[1])
    node.outputs = []
    graph.nodes.append(gs.Node("QuantizeLinear", b.name("q"), {}, [y, s_y] + ([zp_y] if zp_y is not None else []),
                               [out]))


def _convert_concat(graph: gs.Graph, b: Builder, node: gs.Node) -> None:
    """QLinearConcat(s_y, zp_y, x0, s0, zp0, x1, …) → Q(Concat(DQ(x0, s0, zp0), …))."""
    ins = [_dq(b, node.inputs[k], node.inputs[k + 1], _given(node, k + 2)) for k in range(2, len(node.inputs), 3)]
    y = b.op("Concat", ins, {"axis": node.attrs["axis"]}, dtype=np.float32)
    out, s_y, zp_y = node.outputs[0], node.inputs[0], _given(node, 1)
    node.outputs = []
    graph.nodes.append(gs.Node("QuantizeLinear", b.name("q"), {}, [y, s_y] + ([zp_y] if zp_y is not None else []),
                               [out]))


def run(graph: gs.Graph) -> tuple[int, list[str]]:
    """Returns (number converted, 'name (Op): reason' for each QOperator node left as it was)."""
    converted, kept = 0, []
    for node in list(graph.nodes):
        b = Builder(graph, f"{node.name}/qdq")
        if node.op == "QLinearConcat":
            _convert_concat(graph, b, node)
        elif node.op in RULES:
            reason = _why_not(node, RULES[node.op])
            if reason:
                kept.append(f"{node.name} ({node.op}): {reason}")
                continue
            _convert(graph, b, node, RULES[node.op])
        else:
            continue
        converted += 1
    graph.cleanup()
    return converted, kept
