"""kernelnorm: kernel-wise normalization of ĝ (the paper's ĝ(wⁱ) = sign(ΔL)·zⁱ/‖zⁱ‖·‖wⁱ‖ per kernel i),
in integer arithmetic: each output kernel's step gets an L1 norm proportional to its weight's, and the
tensor's mean step size stays that of plain ĝ, so the same lr grid applies.

Per signed trained weight W (biases and unsigned weights keep ĝ), kernels c along the per-channel axis
(the whole tensor when quantized per tensor: then ĝ is unchanged), n elements, n_c per kernel; int64:
    a_c = Σ_{j∈c} |W_j|,  b_c = Σ_{j∈c} |ĝ_j|
    ā_c = a_c div n_c,   b̄_c = (2^8 · b_c) div n_c,   Ā = Σ_c a_c div n,   B̄ = (2^8 · Σ_c b_c) div n
    g_c = min(16 · 2^8, (2^8 · ā_c · B̄) div max(Ā · b̄_c, 1))        (the kernel's gain, 8 fraction bits)
    ĝ_j ← sign(ĝ_j) · ((|ĝ_j| · g_c + 2^7) div 2^8)                   (int32; round half away from zero)
so |ĝ| grows at most KERNEL_GAIN_MAX = 16× (formulas.lr_bound divides lr_max by it). L1 instead of L2
norms: no integer square root; for Rademacher z every ‖zⁱ‖ is the same, so 1/‖zⁱ‖ is a constant there.

Precondition: ctx.estimate.grad from estimate, ctx.branches.w32 from pair.
Postcondition: ctx.estimate.grad[name] is the normalized int32 ĝ of each signed weight, same shape.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from .context import Context, Pass
from .formulas import KERNEL_GAIN_MAX
from .graph_ops import Builder, Typed

FRACTION = 8


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    if not ctx.spec.kernel_norm:
        return graph
    b = Builder(graph, "kernelnorm")
    grad = dict(ctx.estimate.grad)
    for tr in ctx.trainables:
        if tr.role == "weight" and np.dtype(tr.tensor.dtype).kind == "i":
            grad[tr.name] = normalized(b, b.as_int32(grad[tr.name]), ctx.branches.w32[tr.name], list(tr.shape),
                                       tr.tensor.axis)
    ctx.estimate = dataclasses.replace(ctx.estimate, grad=grad)
    return graph


def normalized(b: Builder, g, w, shape: list[int], axis: int | None):
    """ĝ of one weight, normalized per kernel (the module's formula)."""
    L, I, one = Typed(b, np.int64), b.i32, 1 << FRACTION
    n = int(np.prod(shape))
    n_c = n // shape[axis] if axis is not None else n
    per_kernel = lambda x: L.ReduceSum(x, np.array([a for a in range(len(shape)) if a != axis], np.int64), keepdims=1)
    a = per_kernel(L.Abs(b.cast(w, np.int64)))
    b_sum = per_kernel(L.Abs(b.cast(g, np.int64)))
    a_mean, b_mean = L.Div(a, n_c), L.Div(L.Mul(b_sum, one), n_c)
    a_all, b_all = L.Div(L.ReduceSum(a, keepdims=0), n), L.Div(L.Mul(L.ReduceSum(b_sum, keepdims=0), one), n)
    gain = L.Min(L.Div(L.Mul(L.Mul(a_mean, b_all), one), L.Max(L.Mul(a_all, b_mean), 1)), KERNEL_GAIN_MAX * one)
    gain = b.cast(gain, np.int32, hint="gain")
    return I.Mul(I.Sign(g), I.Div(I.Add(I.Mul(I.Abs(g), gain), one // 2), one), hint="g_kernel")


PASS = Pass("kernelnorm", run, reads=("trainables", "branches", "estimate"))
