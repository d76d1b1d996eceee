"""loop_sum: ĝ = Σᵢ cᵢ·zᵢ as an ONNX Loop over the m pairs, for the memory-bounded form.

    ĝ₀ = 0,   ĝᵢ₊₁ = ĝᵢ + cᵢ·zᵢ   zᵢ drawn again inside the body from the counter i (prng's z_at)
No [m, *shape] tensor exists: one zᵢ at a time is alive. int32 addition is exact within lr_max's bound
(|ĝ| <= m·c_max·z_max), so the carried sum has the same bits as estimate's ReduceSum over a
materialised z.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .graph_ops import Builder


def looped_sum(graph: gs.Graph, c, m: int, z_at, trainables) -> dict[str, gs.Tensor]:
    """{name: ĝ int32 [*shape]} for the int32 [m] coefficients c."""
    b, body = Builder(graph, "grad_loop"), gs.Graph(name="gradient_sum")
    bb = Builder(body, "grad_loop_body")
    i = gs.Variable(bb.name("i"), dtype=np.int64, shape=[])
    cond = gs.Variable(bb.name("cond"), dtype=bool, shape=[])
    carried = [gs.Variable(bb.name("g"), dtype=np.int32, shape=list(tr.shape)) for tr in trainables]
    body.inputs = [i, cond] + carried
    ci = bb.op("Gather", [c, i], {"axis": 0}, dtype=np.int32, shape=[])
    z = z_at(bb, bb.cast(bb.op("Unsqueeze", [i, np.array([0], np.int64)], dtype=np.int64), np.int32))
    body.outputs = [bb.op("Identity", [cond], dtype=bool, shape=[])] + [
        bb.i32.Add(g, bb.i32.Mul(ci, z[tr.name]), hint="g_next", shape=list(tr.shape))
        for g, tr in zip(carried, trainables)]
    zeros = [b.i32.Expand(np.array(0, np.int32), np.array(tr.shape, np.int64), hint="zero") for tr in trainables]
    sums = [gs.Variable(b.name("g"), dtype=np.int32, shape=list(tr.shape)) for tr in trainables]
    graph.nodes.append(gs.Node("Loop", b.name("loop"), {"body": body},
                               [b.const(np.array(m, np.int64)), b.const(np.array(True))] + zeros, sums))
    return {tr.name: g for tr, g in zip(trainables, sums)}
