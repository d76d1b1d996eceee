"""update: the integer weight update with a fixed-point learning rate.

    η = lr / 2^s             lr: int32 input (clipped to [0, lr_max]), s = spec.lr_shift
    t = lr · ĝ
    r = sign(t) · ((|t| + h) div 2^s)    h = 2^(s−1) (nearest, ties away from 0) | u ∈ [0, 2^s) (stochastic)
    W ← clip(W − step · r, qmin, qmax)

lr_max keeps lr·ĝ inside int32: |ĝ| <= m · c_max · z_max, so lr_max = (2^31 − 1 − 2^s) // (m · c_max · z_max).
r is saturated to (2^30 − 1) // step before the step multiply, so W − step·r never wraps.

Precondition: ctx.grad from estimate, ctx.w32 from pair (and ctx.round_noise for stochastic rounding).
Postcondition: an `lr` input (int32 scalar); ctx.state_out[name] is the updated tensor named
`<name>__next`, of the state's dtype and shape.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fgcompile.errors import SpecError
from .context import Context
from .estimate import coefficient_bound
from .graph_ops import Builder, onnx_dtype

Z_MAX = {"rademacher": 1, "ternary": 1, "gaussian": 4}


def lr_bound(spec) -> int:
    return (2 ** 31 - 1 - (1 << spec.lr_shift)) // (spec.m * coefficient_bound(spec) * Z_MAX[spec.perturbation])


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    spec = ctx.spec
    b = Builder(graph, "update")
    ctx.lr_max = lr_bound(spec)
    if spec.lr_numerator > ctx.lr_max:
        raise SpecError(f"--lr {spec.lr}: lr·ĝ would overflow int32 (numerator {spec.lr_numerator} > "
                        f"{ctx.lr_max} for m={spec.m}, {spec.estimator}, {spec.perturbation}). Lower --lr.")
    ctx.lr = gs.Variable("lr", dtype=np.int32, shape=[])
    graph.inputs.append(ctx.lr)
    i32 = lambda v: np.array(v, np.int32)
    lr = b.clip_int32(ctx.lr, 0, ctx.lr_max, hint="lr")
    for tr in ctx.trainables:
        t = b.op("Mul", [ctx.grad[tr.name], lr], dtype=np.int32, hint="t")
        if spec.lr_shift == 0:
            r = t
        else:
            h = ctx.round_noise[tr.name] if spec.rounding == "stochastic" else i32(1 << (spec.lr_shift - 1))
            mag = b.op("Div", [b.op("Add", [b.op("Abs", [t], dtype=np.int32), h], dtype=np.int32),
                               i32(1 << spec.lr_shift)], dtype=np.int32)
            r = b.op("Mul", [b.op("Sign", [t], dtype=np.int32), mag], dtype=np.int32, hint="r")
        if tr.step > 1:
            bound = (2 ** 30 - 1) // tr.step
            r = b.op("Mul", [b.clip_int32(r, -bound, bound), i32(tr.step)], dtype=np.int32)
        new = b.clip_int32(b.op("Sub", [ctx.w32[tr.name], r], dtype=np.int32), tr.qmin, tr.qmax)
        out = gs.Variable(tr.output_name, dtype=np.dtype(tr.tensor.dtype), shape=list(tr.tensor.shape))
        graph.nodes.append(gs.Node("Cast", b.name("next"), {"to": onnx_dtype(tr.tensor.dtype)}, [new], [out]))
        ctx.state_out[tr.name] = out
    return graph
