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
from .graph_ops import Builder, Typed

i64 = lambda *v: np.array(v, np.int64)


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    b = Builder(graph, "loss")
    F, L, m = b.f32, Typed(b, np.int64), ctx.spec.m
    labels = gs.Variable("labels", dtype=np.int64, shape=["batch"])
    graph.inputs.append(labels)
    logits, bx = ctx.branches.logits, ctx.branches.logits_branch_axis
    batch_axis = 1 - bx
    spread = [1, 1, 1]
    spread[bx] = 2 * m
    if ctx.spec.loss == "ce":
        idx = L.Expand(L.Unsqueeze(labels, i64(bx, 2)), i64(*spread))
        picked = F.GatherElements(F.LogSoftmax(logits, axis=-1), idx, axis=2)
        per_branch = F.Neg(F.ReduceMean(picked, i64(batch_axis, 2), keepdims=0))
    else:
        prob = F.Softmax(logits, axis=-1)
        depth = L.Gather(L.Shape(logits), i64(-1))
        onehot = F.Unsqueeze(F.OneHot(labels, depth, np.array([0, 1], np.float32), axis=-1), i64(bx))
        diff = F.Sub(prob, onehot)
        per_branch = F.ReduceMean(F.Mul(diff, diff), i64(batch_axis, 2), keepdims=0)
    plus = F.Slice(per_branch, i64(0), i64(m), hint="plus", name="loss_plus", shape=[m])
    minus = F.Slice(per_branch, i64(m), i64(2 * m), hint="minus", name="loss_minus", shape=[m])
    loss = F.ReduceMean(per_branch, keepdims=0, hint="mean", name="loss", shape=[])
    hits = b.op("Equal", [L.ArgMax(logits, axis=-1, keepdims=0), L.Unsqueeze(labels, i64(bx))], dtype=bool)
    accuracy = F.ReduceMean(b.cast(hits, np.float32), keepdims=0, hint="acc", name="accuracy", shape=[])
    ctx.losses = Losses(labels, plus, minus, [loss, accuracy])
    return graph

PASS = Pass("loss", run, reads=("branches",), adds=("losses",))
