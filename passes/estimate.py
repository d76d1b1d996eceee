"""estimate: the forward-gradient estimate ĝ, in int32.

    dᵢ = L⁺ᵢ − L⁻ᵢ                        (NaN → 0: a broken pair contributes nothing)
    dᵢ = 0 where |dᵢ| <= 2^-19 · max(|L⁺ᵢ|, |L⁻ᵢ|)
        (a tie: equal logits can still give losses a few ULPs apart, because the runtime reduces each
        branch at a different memory offset; without the tolerance a tie would move W at random)
    sign (Sign-m-SPSA, default): cᵢ = sign(dᵢ) ∈ {−1, 0, +1}      (a tie dᵢ = 0 gives 0)
    spsa (m-SPSA):                cᵢ = clip(round(gain · dᵢ), −127, 127)
    ĝ = Σᵢ cᵢ · zᵢ

Only the m scalars cᵢ leave float; ĝ is integer arithmetic end to end.

Precondition: ctx.loss_plus/minus from loss, ctx.z from prng.
Postcondition: ctx.grad[name] is int32 [*shape] for each trainable; ctx.coefficients is the int32 [m]
tensor of the cᵢ (where the step leaves float).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .context import Context
from .graph_ops import Builder

SPSA_CLIP = 127
TIE_TOLERANCE = 2.0 ** -19


def coefficient_bound(spec) -> int:
    return 1 if spec.estimator == "sign" else SPSA_CLIP


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    b = Builder(graph, "estimate")
    spec = ctx.spec
    d = b.op("Sub", [ctx.loss_plus, ctx.loss_minus], dtype=np.float32, hint="d")
    scale = b.op("Max", [b.op("Abs", [ctx.loss_plus], dtype=np.float32), b.op("Abs", [ctx.loss_minus], dtype=np.float32)],
                 dtype=np.float32)
    # one comparison does both: a NaN d (or an Inf loss) compares false, like a tie, and gives 0
    informative = b.op("Greater", [b.op("Abs", [d], dtype=np.float32),
                                   b.op("Mul", [scale, np.array(TIE_TOLERANCE, np.float32)], dtype=np.float32)],
                       dtype=bool)
    d = b.op("Where", [informative, d, np.array(0, np.float32)], dtype=np.float32, hint="d_untied")
    if spec.estimator == "sign":
        c = b.op("Sign", [d], dtype=np.float32)
    else:
        scaled = b.op("Round", [b.op("Mul", [d, np.array(spec.spsa_gain, np.float32)], dtype=np.float32)],
                      dtype=np.float32)
        c = b.op("Clip", [scaled, np.array(-SPSA_CLIP, np.float32), np.array(SPSA_CLIP, np.float32)],
                 dtype=np.float32)
    c = b.cast(c, np.int32, hint="c")
    ctx.coefficients = c
    for tr in ctx.trainables:
        rank = len(tr.tensor.shape)
        ci = b.op("Reshape", [c, np.array([spec.m] + [1] * rank, np.int64)], dtype=np.int32)
        terms = b.op("Mul", [ci, ctx.z[tr.name]], dtype=np.int32)
        ctx.grad[tr.name] = b.op("ReduceSum", [terms, np.array([0], np.int64)], {"keepdims": 0},
                                 dtype=np.int32, hint="g")
    return graph
