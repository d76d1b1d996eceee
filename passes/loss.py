"""loss: per-branch losses in-graph from the branch outputs and a `labels` input.

    ce:  L = mean_b( −log_softmax(logits_b)[y_b] )
    mse: L = mean_{b,c}( (softmax(logits_b)_c − onehot(y_b)_c)² )      (Brier score)
    bce: L = mean_{b,k}( max(z_bk, 0) − z_bk·y_bk + log(1 + e^−|z_bk|) )   (z: the logit before a Sigmoid
         output, y ∈ {0, 1}; the logistic loss in the form that neither overflows nor loses e^−|z|)
All 2m branches arrive stacked as [2m, B, C] and are reduced at once; loss_plus = L[0:m], loss_minus = L[m:2m]
(--estimator head: one clean forward [1, B, C], m = 1, and loss_plus = loss_minus = its loss).
Also reports loss (mean of all branch losses) and accuracy (mean of all branches' hits: top-1 for ce/mse,
z > 0 ⇔ y = 1 per label for bce, i.e. the probability thresholded at 0.5): cheap training metrics of
the weights around W.

Precondition: ctx.branches.logits from pair, float [2m, B, C] (or [B, 2m, C]: logits_branch_axis 1); the
spec's loss resolved (not auto).
Postcondition: input `labels` (int64 [B]; [B, K] for bce with K > 1 labels); ctx.losses.plus, .minus float
[m] (`loss_plus`, `loss_minus`); .metrics holds `loss` and `accuracy` (float scalars); for --estimator node,
.per_example float [2m, B]: each example's loss per branch (its mean over classes or labels). The ce loss
over a known number of classes, and bce of one label, also decide in integers (passes/integer_loss.py): .signs int32 [m, B] (node)
or .difference int32 [m] (sign, spsa), which the estimates read instead of the float losses.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import integer_loss
from .context import Context, Losses, Pass
from .graph_ops import Builder, Typed

i64 = lambda *v: np.array(v, np.int64)


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    b = Builder(graph, "loss")
    F, m = b.f32, ctx.spec.m
    one_label = ctx.spec.loss != "bce" or ctx.io.classes == 1
    labels = gs.Variable("labels", dtype=np.int64, shape=["batch"] if one_label else ["batch", ctx.io.classes])
    graph.inputs.append(labels)
    bx = ctx.branches.logits_branch_axis
    n = 1 if ctx.spec.estimator == "head" else 2 * m     # head: one clean forward, L⁺ = L⁻ = its loss
    terms, hits = LOSSES[ctx.spec.loss](b, ctx.branches.logits, labels, bx, n)
    per_branch = F.ReduceMean(terms, i64(1 - bx, 2), keepdims=0)
    plus = F.Slice(per_branch, i64(0), i64(m), hint="plus", name="loss_plus", shape=[m])
    minus = F.Slice(per_branch, i64(m), i64(2 * m), hint="minus", name="loss_minus", shape=[m]) \
        if ctx.spec.estimator != "head" else F.Identity(plus, hint="minus", name="loss_minus", shape=[m])
    loss = F.ReduceMean(per_branch, keepdims=0, hint="mean", name="loss", shape=[])
    accuracy = F.ReduceMean(b.cast(hits, np.float32), keepdims=0, hint="acc", name="accuracy", shape=[])
    ctx.losses = Losses(labels, plus, minus, [loss, accuracy])
    if ctx.spec.estimator == "node":
        per_example = F.ReduceMean(terms, i64(2), keepdims=0, hint="per_example")
        ctx.losses.per_example = per_example if bx == 0 else F.Transpose(per_example, perm=[1, 0])
    if ctx.spec.estimator != "head" and integer_loss.applies(ctx.spec.loss, ctx.io.classes):
        decide = integer_loss.example_signs if ctx.spec.estimator == "node" else integer_loss.branch_differences
        result = decide(Builder(graph, "integer_loss"), ctx.branches.logits, labels, m, bx, ctx.io.classes,
                        ctx.spec.loss)
        if ctx.spec.estimator == "node":
            ctx.losses.signs = result
        else:
            ctx.losses.difference = result
    return graph


# each loss: (b, logits, labels, branch axis bx, branches n) -> (terms, hits bool): the loss is the mean of the terms
# over the batch axis 1 − bx and axis 2 (classes or labels)
def _ce(b: Builder, logits, labels, bx: int, n: int):
    spread = [1, 1, 1]
    spread[bx] = n
    L = Typed(b, np.int64)
    idx = L.Expand(L.Unsqueeze(labels, i64(bx, 2)), i64(*spread))
    picked = b.f32.GatherElements(b.f32.LogSoftmax(logits, axis=-1), idx, axis=2)
    return b.f32.Neg(picked), _top1(b, logits, labels, bx)


def _mse(b: Builder, logits, labels, bx: int, n: int):
    F, L = b.f32, Typed(b, np.int64)
    depth = L.Gather(L.Shape(logits), i64(-1))
    onehot = F.Unsqueeze(F.OneHot(labels, depth, np.array([0, 1], np.float32), axis=-1), i64(bx))
    diff = F.Sub(F.Softmax(logits, axis=-1), onehot)
    return F.Mul(diff, diff), _top1(b, logits, labels, bx)


def _top1(b: Builder, logits, labels, bx: int):
    L = Typed(b, np.int64)
    return b.op("Equal", [L.ArgMax(logits, axis=-1, keepdims=0), L.Unsqueeze(labels, i64(bx))], dtype=bool)


def _bce(b: Builder, z, labels, bx: int, n: int):
    """z: the logits before the Sigmoid; labels 0/1, [B] (one label) or [B, K]; hits: z > 0 ⇔ y = 1."""
    F = b.f32
    y = labels if len(labels.shape) == 2 else b.op("Unsqueeze", [labels, i64(1)], dtype=np.int64)   # [B, K]
    y = b.op("Unsqueeze", [y, i64(bx)], dtype=np.int64)                                             # beside the branches
    t = b.cast(y, np.float32)
    per = F.Add(F.Sub(F.Relu(z), F.Mul(z, t)), F.Softplus(F.Neg(F.Abs(z))))
    hits = b.op("Equal", [b.op("Greater", [z, np.array(0, np.float32)], dtype=bool), b.cast(y, bool)], dtype=bool)
    return per, hits


LOSSES = {"ce": _ce, "mse": _mse, "bce": _bce}

PASS = Pass("loss", run, reads=("branches",), adds=("losses",))
