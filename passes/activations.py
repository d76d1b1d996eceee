"""activations: the compiled graphs hold int8 activation Q→DQ pairs as uint8, with the same values.

    Q(x; s, z)  = sat_int8(round(x / s) + z)          =  Q(x; s, z + 128) − 128   on uint8
    DQ(q; s, z) = (q − z)·s                           =  DQ(q + 128; s, z + 128)

so moving a pair's zero points (Q's and each reading DQ's) up by 128 changes no dequantized value.
Two reasons, both onnxruntime's: its QDQ fusions take uint8 activations (an int8 QuantizeLinear feeding
both branch copies of a Conv falls back to a float Conv), and at opset 21 its QDQ propagation inserts a
QuantizeLinear with `output_dtype` after a Reshape/Transpose/Unsqueeze that reads a DQ, which its S8→U8
rewrite then breaks by swapping in a uint8 zero point ("Node (view_q) ... output_dtype INT8 does not
match y_zero_point type UINT8"); uint8 pairs give that rewrite nothing to do. ctx.source, and so the
exported model, keeps the int8 pairs as they were.

Precondition: a gs.Graph (canonical: no QuantizeLinear has `output_dtype` beside its zero point).
Postcondition: every QuantizeLinear of a computed tensor with a constant int8 zero point, read only by
DequantizeLinear nodes with constant int8 zero points, is uint8 with those zero points + 128; the graph
computes the same function (tests/passes/test_int8_activations.py: eval graph == source, bit for bit).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .context import Context, Pass
from .graph_ops import Builder, optional_input


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    b, shifted = Builder(graph, "activations"), {}
    pairs = [q for q in graph.nodes if _signed_pair(graph, q)]
    for q in pairs:
        for node in [q] + q.outputs[0].outputs:
            zp = node.inputs[2]
            if id(zp) not in shifted:        # a zero point shared with a node left as it is stays too
                shifted[id(zp)] = b.const((zp.values.astype(np.int16) + 128).astype(np.uint8), "zero_point")
            node.inputs[2] = shifted[id(zp)]
        q.outputs[0].dtype = np.uint8
    if pairs:
        ctx.notes.append(f"{len(pairs)} int8 activation Q→DQ pairs run as uint8 (zero point + 128, the same "
                         "values); the exported model keeps int8")
    return graph


def _signed_pair(graph: gs.Graph, q: gs.Node) -> bool:
    def int8_zero_point(node):
        zp = optional_input(node, 2)
        return isinstance(zp, gs.Constant) and zp.values.dtype == np.int8
    if q.op != "QuantizeLinear" or isinstance(q.inputs[0], gs.Constant) or not int8_zero_point(q):
        return False
    out = q.outputs[0]
    readers = out.outputs
    return bool(readers) and out not in graph.outputs and all(
        d.op == "DequantizeLinear" and d.inputs[0] is out and int8_zero_point(d) for d in readers)


PASS = Pass("activations", run, reads=("notes",))
