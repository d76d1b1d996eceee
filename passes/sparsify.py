"""sparsify: a sparse update, leaving a share `sparsity` of each trained tensor's elements unchanged per
step (the paper's partial update: ~90% fewer updated parameters for a small accuracy cost), in int32.

    ĝ_j ← ĝ_j · keep_j,   per trained tensor of n elements, u_j ∈ [0, 2^16) from the hash (prng stream m + 1)
    topk:       keep_j = key_j >= the k-th largest key,  key_j = min(|ĝ_j|, 2^16 − 1) · 2^15 + (u_j & (2^15 − 1)),
                k = max(1, round((1 − sparsity) · n))      (the largest |ĝ|; the hashed low bits break ties
                at random, not towards low indices; the update |round(lr·ĝ/2^s)| is monotone in |ĝ|, so this
                is also the top-k of the weight update)
    random:     keep_j = u_j < round((1 − sparsity) · 2^16)
    threshold:  keep_j = |ĝ_j| · 256 >= max_j |ĝ_j| · round(256 · sparsity)    (the kept share varies per step)
key < 2^31: it stays int32; onnxruntime's TopK takes int32.

Precondition: ctx.estimate.grad (after kernelnorm), ctx.perturbations.sparse_noise for topk and random.
Postcondition: ctx.estimate.grad[name] is the masked int32 ĝ, same shape; nothing else changes.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from .context import Context, Pass
from .graph_ops import Builder


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    spec = ctx.spec
    if spec.sparsity == 0:
        return graph
    b = Builder(graph, "sparsify")
    I = b.i32
    less = lambda x, y: b.op("Less", [x, y], dtype=bool)
    grad = {}
    for tr in ctx.trainables:
        g = b.as_int32(ctx.estimate.grad[tr.name])
        if spec.sparse_mode == "random":
            keep = less(ctx.perturbations.sparse_noise[tr.name], np.array(round((1 - spec.sparsity) * 2 ** 16), np.int32))
        elif spec.sparse_mode == "threshold":
            bar = I.Mul(I.ReduceMax(I.Abs(g), keepdims=0), round(256 * spec.sparsity))
            keep = b.op("Not", [less(I.Mul(I.Abs(g), 256), bar)], dtype=bool)
        else:
            k = max(1, round((1 - spec.sparsity) * tr.tensor.numel))
            key = I.Add(I.Mul(I.Min(I.Abs(g), 2 ** 16 - 1), 2 ** 15),
                        I.BitwiseAnd(ctx.perturbations.sparse_noise[tr.name], 2 ** 15 - 1), hint="key")
            top, index = b.op("TopK", [I.Reshape(key, np.array([-1], np.int64)), np.array([k], np.int64)],
                              {"largest": 1, "sorted": 0}, dtype=np.int32, outputs=2)
            index.dtype = np.int64
            keep = b.op("Not", [less(key, I.ReduceMin(top, keepdims=0, hint="kth"))], dtype=bool)
        grad[tr.name] = I.Where(keep, g, 0, hint="g_sparse")
    ctx.estimate = dataclasses.replace(ctx.estimate, grad=grad)
    return graph


PASS = Pass("sparsify", run, reads=("trainables", "perturbations", "estimate"))
