"""loop_sum: ĝ = Σᵢ cᵢ·zᵢ as an ONNX Loop over the m pairs, for the memory-bounded form.

    ĝ₀ = 0,   ĝᵢ₊₁ = ĝᵢ + cᵢ·zᵢ   zᵢ drawn again inside the body from the counter i (prng's z_at)
No [m, *shape] tensor exists: one zᵢ at a time is alive. The sum is carried in the narrowest integer
dtype that holds |ĝ| <= m·c_max·z_max (formulas.narrow_grad_dtype: int8 for the default Sign-m-SPSA),
where every partial sum is exact too, so ĝ has the same values as estimate's int32 ReduceSum over a
materialised z, at a quarter (or half) of its bytes.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .graph_ops import Builder


def looped_sum(graph: gs.Graph, c, m: int, z_at, trainables, dtype) -> dict[str, gs.Tensor]:
    """{name: ĝ [*shape] of `dtype`} for the int32 [m] coefficients c."""
    b, body = Builder(graph, "grad_loop"), gs.Graph(name="gradient_sum")
    bb = Builder(body, "grad_loop_body")
    i = gs.Variable(bb.name("i"), dtype=np.int64, shape=[])
    cond = gs.Variable(bb.name("cond"), dtype=bool, shape=[])
    carried = [gs.Variable(bb.name("g"), dtype=dtype, shape=list(tr.shape)) for tr in trainables]
    body.inputs = [i, cond] + carried
    ci = bb.cast(bb.op("Gather", [c, i], {"axis": 0}, dtype=np.int32, shape=[]), dtype)
    z = z_at(bb, bb.cast(bb.op("Unsqueeze", [i, np.array([0], np.int64)], dtype=np.int64), np.int32), trainables)
    term = lambda zi: bb.op("Mul", [ci, zi if zi.dtype == dtype else bb.cast(zi, dtype)], dtype=dtype)
    body.outputs = [bb.op("Identity", [cond], dtype=bool, shape=[])] + [
        bb.op("Add", [g, term(z[tr.name])], dtype=dtype, hint="g_next", shape=list(tr.shape))
        for g, tr in zip(carried, trainables)]
    zeros = [b.op("Expand", [np.array(0, dtype), np.array(tr.shape, np.int64)], dtype=dtype, hint="zero")
             for tr in trainables]
    sums = [gs.Variable(b.name("g"), dtype=dtype, shape=list(tr.shape)) for tr in trainables]
    graph.nodes.append(gs.Node("Loop", b.name("loop"), {"body": body},
                               [b.const(np.array(m, np.int64)), b.const(np.array(True))] + zeros, sums))
    return {tr.name: g for tr, g in zip(trainables, sums)}
