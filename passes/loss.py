"""loss: per-branch losses in-graph from the branch outputs and a `labels` input.

    ce:  L = mean_b( −log_softmax(logits_b)[y_b] )
    mse: L = mean_{b,c}( (softmax(logits_b)_c − onehot(y_b)_c)² )      (Brier score)
All 2m branches arrive stacked as [2m, B, C] and are reduced at once; loss_plus = L[0:m], loss_minus = L[m:2m].
Also reports loss (mean of all branch losses) and accuracy (mean of all branches' top-1 hits): cheap
training metrics of the weights around W.

Precondition: ctx.branches.logits from pair, float [2m, B, C] (or [B, 2m, C]: logits_branch_axis 1).
Postcondition: input `labels` (int64 [B]); ctx.losses.plus, .minus float [m] (`loss_plus`, `loss_minus`);
.metrics holds `loss` and `accuracy` (float scalars).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .context import Context, Losses, Pass
from .graph_ops import Builder

i64 = lambda *v: np.array(v, np.int64)


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    b = Builder(graph, "loss")
    m = ctx.spec.m
    labels = gs.Variable("labels", dtype=np.int64, shape=["batch"])
    graph.inputs.append(labels)
    logits, bx = ctx.branches.logits, ctx.branches.logits_branch_axis
    batch_axis = 1 - bx
    spread = [1, 1, 1]
    spread[bx] = 2 * m
    if ctx.spec.loss == "ce":
        logp = b.op("LogSoftmax", [logits], {"axis": -1}, dtype=np.float32)
        idx = b.op("Unsqueeze", [labels, i64(bx, 2)], dtype=np.int64)
        idx = b.op("Expand", [idx, i64(*spread)], dtype=np.int64)
        picked = b.op("GatherElements", [logp, idx], {"axis": 2}, dtype=np.float32)
        per_branch = b.op("Neg", [b.op("ReduceMean", [picked, i64(batch_axis, 2)], {"keepdims": 0},
                                       dtype=np.float32)], dtype=np.float32)
    else:
        prob = b.op("Softmax", [logits], {"axis": -1}, dtype=np.float32)
        depth = b.op("Gather", [b.op("Shape", [logits], dtype=np.int64), i64(-1)], dtype=np.int64)
        onehot = b.op("OneHot", [labels, depth, np.array([0, 1], np.float32)], {"axis": -1},
                      dtype=np.float32)
        onehot = b.op("Unsqueeze", [onehot, i64(bx)], dtype=np.float32)
        diff = b.op("Sub", [prob, onehot], dtype=np.float32)
        per_branch = b.op("ReduceMean", [b.op("Mul", [diff, diff], dtype=np.float32), i64(batch_axis, 2)],
                          {"keepdims": 0}, dtype=np.float32)
    plus = gs.Variable("loss_plus", dtype=np.float32, shape=[m])
    minus = gs.Variable("loss_minus", dtype=np.float32, shape=[m])
    graph.nodes.append(gs.Node("Slice", b.name("plus"), inputs=[per_branch, b.const(i64(0)), b.const(i64(m))],
                               outputs=[plus]))
    graph.nodes.append(gs.Node("Slice", b.name("minus"), inputs=[per_branch, b.const(i64(m)),
                                                                 b.const(i64(2 * m))], outputs=[minus]))
    loss = gs.Variable("loss", dtype=np.float32, shape=[])
    graph.nodes.append(gs.Node("ReduceMean", b.name("mean"), {"keepdims": 0}, [per_branch], [loss]))
    wanted = b.op("Unsqueeze", [labels, i64(bx)], dtype=np.int64)
    hits = b.op("Equal", [b.op("ArgMax", [logits], {"axis": -1, "keepdims": 0}, dtype=np.int64), wanted],
                dtype=bool)
    accuracy = gs.Variable("accuracy", dtype=np.float32, shape=[])
    graph.nodes.append(gs.Node("ReduceMean", b.name("acc"), {"keepdims": 0}, [b.cast(hits, np.float32)],
                               [accuracy]))
    ctx.losses = Losses(labels, plus, minus, [loss, accuracy])
    return graph


PASS = Pass("loss", run, reads=("branches",), adds=("losses",))
