"""momentum: an integer momentum buffer v per trained tensor, carried as training state, for the paper's
momentum-guided sampling (--momentum β) and a sharpness-aware perturbation (--sharpness ρ).

    v ← clip(v − (v div 8) + ĝ, −2^30, 2^30)    the raw ĝ of estimate (before kernelnorm, sparsify): an
                                               exponential average with decay 7/8, scaled by 8; div truncates
    momentum-guided sampling (β > 0): zᵢ,ⱼ ← sign(vⱼ) where vⱼ ≠ 0 and cᵢ,ⱼ < round(256·β), else the fresh
        zᵢ,ⱼ; cᵢ,ⱼ an 8-bit chunk of prng stream m + 2 + i. The paper's z = β·z₁ + (1−β)·z₂ (z₂ centred on the
        previous direction) as an integer mixture: a share β of each zᵢ follows the running estimate.
    sharpness-aware (ρ > 0): the ±εz pair is centred at W̃ = clip(W + ρ·stride·sign(v), qmin, qmax), one
        ascent step along the running gradient estimate (SAM's extra step, without an extra forward: v
        stands in for the gradient at W); ĝ is estimated at W̃ and the update still moves W.
sign(v) is ±1, so |z| and lr_max do not change.

State: input `<name>__momentum` int32 [*shape], initially 0, and output `<name>__momentum__next`, listed
in the contract's `state` after the parameters with role "momentum" (export and eval skip it).

Precondition (PASS): ctx.perturbations from prng, ctx.state from lift. Postcondition: ctx.buffers holds the
inputs and contract entries (none without --momentum/--sharpness); ctx.perturbations.z is biased (β > 0) and .ascent set (ρ > 0).
Precondition (UPDATE): ctx.estimate.grad. Postcondition: ctx.buffers.outputs holds every `__next`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from .context import Buffers, Context, Pass
from .graph_ops import Builder

DECAY_SHIFT = 3          # v loses 1/8 of itself per step
BOUND = 2 ** 30          # |v| <= 8·max|ĝ| in practice; the clip only keeps int32 arithmetic from wrapping
SUFFIX = "__momentum"


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    spec = ctx.spec
    ctx.buffers = Buffers({}, {}, [])
    if spec.momentum == 0 and spec.sharpness == 0:
        return graph
    b = Builder(graph, "momentum")
    I = b.i32
    inputs, entries, z, ascent = {}, [], dict(ctx.perturbations.z), {}
    for tr in ctx.trainables:
        v = inputs[tr.name] = gs.Variable(tr.name + SUFFIX, dtype=np.int32, shape=tr.shape)
        graph.inputs.append(v)
        ctx.state.initial[v.name] = np.zeros(tr.shape, np.int32)
        entries.append(dataclasses.replace(tr.contract(), name=v.name, output=v.name + "__next", role="momentum",
                                           dtype="int32", axis=None, qmin=-BOUND, qmax=BOUND, stride=1,
                                           source_dtype="int32", widened=False, factor=1, float_grid=None))
        if spec.momentum > 0:
            z[tr.name] = _guided(b, z[tr.name], ctx.perturbations.momentum_noise[tr.name], v, spec.momentum)
        if spec.sharpness > 0:
            ascent[tr.name] = I.Mul(I.Sign(v, hint="direction"), spec.sharpness * tr.stride, hint="ascent")
    z_at = fresh_at = ctx.perturbations.z_at
    if spec.momentum > 0:      # the memory-bounded form draws zᵢ per pair: bias each row the same way
        noise_at = ctx.perturbations.momentum_at

        def guided_at(b_, i, subset=None):
            fresh, noise = fresh_at(b_, i, subset), noise_at(b_, i)
            return {n: _guided(b_, fresh[n], noise[n], inputs[n], spec.momentum) for n in fresh}
        z_at = guided_at
    ctx.perturbations = dataclasses.replace(ctx.perturbations, z=z, ascent=ascent, z_at=z_at)
    ctx.buffers = Buffers(inputs, {}, entries)
    return graph


def _guided(b: Builder, z, noise, v, beta: float):
    """zⱼ ← sign(vⱼ) where vⱼ ≠ 0 and the noise cⱼ < round(256·β), else zⱼ (any leading pair axis of z and
    noise broadcasts against v)."""
    follow = b.op("And", [b.op("Less", [noise, np.array(round(256 * beta), np.int32)], dtype=bool),
                          b.op("Not", [b.op("Equal", [v, np.array(0, np.int32)], dtype=bool)], dtype=bool)],
                  dtype=bool)
    direction = b.i32.Sign(v, hint="direction")
    if z.dtype == np.int32:
        return b.op("Where", [follow, direction, z], dtype=z.dtype, hint="z_momentum")
    # the Loop's int8 zᵢ: selected in int32 and cast back (onnxruntime 1.25 has no Where on int8)
    return b.cast(b.op("Where", [follow, direction, b.cast(z, np.int32)], dtype=np.int32), z.dtype, hint="z_momentum")


def update(graph: gs.Graph, ctx: Context) -> gs.Graph:
    if not ctx.buffers.inputs:
        return graph
    b = Builder(graph, "momentum_update")
    I = b.i32
    for tr in ctx.trainables:
        v = ctx.buffers.inputs[tr.name]
        decayed = I.Sub(v, I.Div(v, 1 << DECAY_SHIFT))
        ctx.buffers.outputs[tr.name] = b.cast(b.clip_int32(I.Add(decayed, b.as_int32(ctx.estimate.grad[tr.name])), -BOUND, BOUND),
                                              np.int32, hint="next", name=v.name + "__next", shape=tr.shape)
    return graph


PASS = Pass("momentum", run, reads=("trainables", "state", "perturbations"), adds=("buffers",))
UPDATE = Pass("momentum update", update, reads=("trainables", "buffers", "estimate"))
