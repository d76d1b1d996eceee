"""loss: per-branch losses in-graph from the branch outputs and a `labels` input.

    ce:  L = mean_b( −log_softmax(logits_b)[y_b] )
    mse: L = mean_{b,c}( (softmax(logits_b)_c − onehot(y_b)_c)² )      (Brier score)
All 2m branches arrive stacked as [2m, B, C] and are reduced at once; loss_plus = L[0:m], loss_minus = L[m:2m].
Also reports loss (mean of all branch losses) and accuracy (mean of all branches' top-1 hits): cheap
training metrics of the weights around W.

Precondition: ctx.branch_logits from pair, float [2m, B, C] (or the Transpose of a [B, 2m, C]).
Postcondition: inputs `labels` (int64 [B]); ctx.loss_plus, ctx.loss_minus float [m]; ctx.extra_outputs
holds `loss` and `accuracy` (float scalars).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .context import Context
from .graph_ops import Builder

i64 = lambda *v: np.array(v, np.int64)


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    b = Builder(graph, "loss")
    m = ctx.spec.m
    ctx.labels = gs.Variable("labels", dtype=np.int64, shape=["batch"])
    graph.inputs.append(ctx.labels)
    logits, bx = _logits_and_branch_axis(ctx.branch_logits)
    batch_axis = 1 - bx
    spread = [1, 1, 1]
    spread[bx] = 2 * m
    if ctx.spec.loss == "ce":
        logp = b.op("LogSoftmax", [logits], {"axis": -1}, dtype=np.float32)
        idx = b.op("Unsqueeze", [ctx.labels, i64(bx, 2)], dtype=np.int64)
        idx = b.op("Expand", [idx, i64(*spread)], dtype=np.int64)
        picked = b.op("GatherElements", [logp, idx], {"axis": 2}, dtype=np.float32)
        per_branch = b.op("Neg", [b.op("ReduceMean", [picked, i64(batch_axis, 2)], {"keepdims": 0},
                                       dtype=np.float32)], dtype=np.float32)
    else:
        prob = b.op("Softmax", [logits], {"axis": -1}, dtype=np.float32)
        depth = b.op("Gather", [b.op("Shape", [logits], dtype=np.int64), i64(-1)], dtype=np.int64)
        onehot = b.op("OneHot", [ctx.labels, depth, np.array([0, 1], np.float32)], {"axis": -1},
                      dtype=np.float32)
        onehot = b.op("Unsqueeze", [onehot, i64(bx)], dtype=np.float32)
        diff = b.op("Sub", [prob, onehot], dtype=np.float32)
        per_branch = b.op("ReduceMean", [b.op("Mul", [diff, diff], dtype=np.float32), i64(batch_axis, 2)],
                          {"keepdims": 0}, dtype=np.float32)
    ctx.loss_plus = gs.Variable("loss_plus", dtype=np.float32, shape=[m])
    ctx.loss_minus = gs.Variable("loss_minus", dtype=np.float32, shape=[m])
    graph.nodes.append(gs.Node("Slice", b.name("plus"), inputs=[per_branch, b.const(i64(0)), b.const(i64(m))],
                               outputs=[ctx.loss_plus]))
    graph.nodes.append(gs.Node("Slice", b.name("minus"), inputs=[per_branch, b.const(i64(m)),
                                                                 b.const(i64(2 * m))], outputs=[ctx.loss_minus]))
    loss = gs.Variable("loss", dtype=np.float32, shape=[])
    graph.nodes.append(gs.Node("ReduceMean", b.name("mean"), {"keepdims": 0}, [per_branch], [loss]))
    labels = b.op("Unsqueeze", [ctx.labels, i64(bx)], dtype=np.int64)
    hits = b.op("Equal", [b.op("ArgMax", [logits], {"axis": -1, "keepdims": 0}, dtype=np.int64), labels],
                dtype=bool)
    accuracy = gs.Variable("accuracy", dtype=np.float32, shape=[])
    graph.nodes.append(gs.Node("ReduceMean", b.name("acc"), {"keepdims": 0}, [b.cast(hits, np.float32)],
                               [accuracy]))
    ctx.extra_outputs = [loss, accuracy]
    return graph


def _logits_and_branch_axis(logits):
    """(tensor, branch axis). The wide product (passes/stack.py) ends in a Transpose [B, 2m, C] ->
    [2m, B, C]; the loss reduces over batch and classes either way, so it reads the Transpose's input
    and skips a copy of all 2m·B·C logits."""
    node = logits.inputs[0] if logits.inputs else None
    if node is not None and node.op == "Transpose" and list(node.attrs.get("perm", [])) == [1, 0, 2]:
        return node.inputs[0], 1
    return logits, 0
