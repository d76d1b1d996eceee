"""update: the integer weight update with a fixed-point learning rate.

    η = lr_numerator / 2^s   lr_numerator: the int32 `lr` input, clipped to [0, lr_max]; s = spec.lr_shift
    t = lr_numerator · ĝ
    r = sign(t) · ((|t| + h) div 2^s)    h = 2^(s−1) (nearest, ties away from 0) | u ∈ [0, 2^s) (stochastic)
    W ← clip(W − stride · r, qmin, qmax)

lr_max keeps t inside int32 (passes/formulas.py). r is saturated to (2^30 − 1) // stride before the
stride multiply, so W − stride·r never wraps.

Precondition: ctx.estimate.grad from estimate, ctx.branches.w32 from pair (and
ctx.perturbations.round_noise for stochastic rounding).
Postcondition: an `lr` input (int32 scalar); ctx.update.state_out[name] is the updated tensor named
`<name>__next`, of the state's dtype and shape.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fgcompile.errors import SpecError
from .context import Context, Pass, Update
from .formulas import lr_bound
from .graph_ops import Builder


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    spec, s = ctx.spec, ctx.spec.lr_shift
    b = Builder(graph, "update")
    I = b.i32
    lr_max = lr_bound(spec)
    if spec.lr_numerator > lr_max:
        raise SpecError(f"--lr {spec.lr}: lr_numerator·ĝ would overflow int32 (numerator {spec.lr_numerator} > "
                        f"{lr_max} for m={spec.m}, {spec.estimator}, {spec.perturbation}). Lower --lr.")
    lr_numerator = gs.Variable("lr", dtype=np.int32, shape=[])
    graph.inputs.append(lr_numerator)
    numerator = b.clip_int32(lr_numerator, 0, lr_max, hint="lr")
    state_out = {}
    for tr in ctx.trainables:
        t = I.Mul(ctx.estimate.grad[tr.name], numerator, hint="t")
        if s == 0:
            r = t
        else:
            h = ctx.perturbations.round_noise[tr.name] if spec.rounding == "stochastic" else 1 << (s - 1)
            r = I.Mul(I.Sign(t), I.Div(I.Add(I.Abs(t), h), 1 << s), hint="r")
        if tr.stride > 1:
            bound = (2 ** 30 - 1) // tr.stride
            r = I.Mul(b.clip_int32(r, -bound, bound), tr.stride)
        new = b.clip_int32(I.Sub(ctx.branches.w32[tr.name], r), tr.qmin, tr.qmax)
        state_out[tr.name] = b.cast(new, tr.tensor.dtype, hint="next", name=tr.output_name, shape=tr.shape)
    ctx.update = Update(lr_numerator, lr_max, state_out)
    return graph


PASS = Pass("update", run, reads=("trainables", "perturbations", "branches", "estimate"), adds=("update",))
