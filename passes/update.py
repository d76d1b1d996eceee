"""update: the integer weight update with a fixed-point learning rate.

    η = lr_numerator / 2^s   lr_numerator: the int32 `lr` input, clipped to [0, lr_max]; s = spec.lr_shift
    t = lr_numerator · ĝ
    r = sign(t) · ((|t| + h) div 2^s)    h = 2^(s−1) (nearest, ties away from 0) | u ∈ [0, 2^s) (stochastic)
    W ← clip(W − stride · r, qmin, qmax)

lr_max keeps t inside int32 (passes/formulas.py); for node and head, whose ĝ has no static bound, ĝ is
first saturated to ±(2^31 − 1 − 2^s) // max(lr_numerator, 1) instead (formulas.saturates_at_rate). r is
saturated to (2^30 − 1) // stride before the stride multiply, so W − stride·r never wraps. In the memory-bounded form (--branches loop) a tensor of
more than formulas.CHUNK elements is updated in row chunks (a Loop over slices of its leading axis),
so its int32 temporaries hold one chunk, not the whole tensor; where estimate gives ĝ by rows
(ctx.estimate.rows), each chunk also draws its own zᵢ and sums its ĝ, which then never exists whole.
The formula is elementwise, so the values are the same.

Precondition: ctx.estimate.grad from estimate (int32, or int8/int16 in the loop form), ctx.state from
lift, ctx.branches.w32 from pair (and ctx.perturbations.round_noise for stochastic rounding).
Postcondition: an `lr` input (int32 scalar); ctx.update.state_out[name] is the updated tensor named
`<name>__next`, of the state's dtype and shape.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fgcompile.errors import SpecError
from .context import Context, Pass, Update
from .formulas import chunk_rows, chunked, compute_shape, lr_bound, saturates_at_rate, update_room
from .graph_ops import Builder


def _next(b: Builder, spec, tr, g, w, noise, numerator, g_max):
    """clip(W − stride·r, qmin, qmax) in int32, for ĝ, W (and the stochastic noise) of any one shape; ĝ
    saturated to ±g_max first where given."""
    I, s = b.i32, spec.lr_shift
    g = b.as_int32(g) if g_max is None else I.Clip(b.as_int32(g), g_max[0], g_max[1], hint="g_in_rate")
    t = I.Mul(g, numerator, hint="t")
    if s == 0:
        r = t
    else:
        h = noise if spec.rounding == "stochastic" else 1 << (s - 1)
        r = I.Mul(I.Sign(t), I.Div(I.Add(I.Abs(t), h), 1 << s), hint="r")
    if tr.stride > 1:
        bound = (2 ** 30 - 1) // tr.stride
        r = I.Mul(b.clip_int32(r, -bound, bound), tr.stride)
    return b.clip_int32(I.Sub(b.as_int32(w), r), tr.qmin, tr.qmax)


def _in_chunks(graph: gs.Graph, b: Builder, spec, tr, rows: int, tensors: list, numerator, g_max, grad_at=None):
    """The next weights of `tr` from a Loop over chunks of `rows` rows of its state and ĝ (and noise), ĝ's
    chunk made by grad_at(b, k) when given: the scan output [chunks, rows, ...] reshaped to the shape."""
    chunks = tr.shape[0] // rows
    split = np.array([chunks, rows] + list(tr.shape[1:]), np.int64)
    outer = [None if t is None else b.op("Reshape", [t, split], dtype=t.dtype, hint="chunked") for t in tensors]
    body = gs.Graph(name="update_chunk")
    bb = Builder(body, "update_chunk")
    k = gs.Variable(bb.name("k"), dtype=np.int64, shape=[])
    cond = gs.Variable(bb.name("cond"), dtype=bool, shape=[])
    body.inputs = [k, cond]
    g, w, noise = [None if t is None else bb.op("Gather", [t, k], {"axis": 0}, dtype=t.dtype) for t in outer]
    new = bb.cast(_next(bb, spec, tr, grad_at(bb, k) if grad_at else g, w, noise, numerator, g_max), tr.tensor.dtype)
    body.outputs = [bb.op("Identity", [cond], dtype=bool, shape=[]), new]
    scanned = gs.Variable(b.name("next_chunks"), dtype=np.dtype(tr.tensor.dtype))
    graph.nodes.append(gs.Node("Loop", b.name("loop"), {"body": body},
                               [b.const(np.array(chunks, np.int64)), b.const(np.array(True))], [scanned]))
    return b.op("Reshape", [scanned, np.array(tr.shape, np.int64)], dtype=np.dtype(tr.tensor.dtype), hint="next",
                name=tr.output_name, shape=tr.shape)


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    spec = ctx.spec
    b = Builder(graph, "update")
    lr_max = lr_bound(spec)
    if spec.lr_numerator > lr_max:
        raise SpecError(f"--lr {spec.lr}: lr_numerator·ĝ would overflow int32 (numerator {spec.lr_numerator} > "
                        f"{lr_max} for m={spec.m}, {spec.estimator}, {spec.perturbation}). Lower --lr.")
    lr_numerator = gs.Variable("lr", dtype=np.int32, shape=[])
    graph.inputs.append(lr_numerator)
    numerator = b.clip_int32(lr_numerator, 0, lr_max, hint="lr")
    g_max = None
    if saturates_at_rate(spec):     # [−g_max, g_max] of ĝ, from the rate given (numerator 0 moves nothing)
        top = b.i32.Div(np.int32(update_room(spec.lr_shift)), b.i32.Max(numerator, np.int32(1)), hint="g_max")
        g_max = (b.i32.Neg(top, hint="g_min"), top)
    state_out = {}
    for tr in ctx.trainables:
        w, noise = ctx.state.inputs[tr.name], ctx.perturbations.round_noise.get(tr.name)
        if tr.name in ctx.estimate.rows:      # ĝ made a chunk at a time, never whole
            by_rows = ctx.estimate.rows[tr.name]
            state_out[tr.name] = _in_chunks(graph, b, spec, tr, by_rows.rows, [None, w, noise], numerator, g_max,
                                            by_rows.at)
        elif ctx.branches.form == "loop" and chunked(tr.shape):
            state_out[tr.name] = _in_chunks(graph, b, spec, tr, chunk_rows(tr.shape),
                                            [ctx.estimate.grad[tr.name], w, noise], numerator, g_max)
        else:
            # on the view without trailing size-1 axes (formulas.compute_shape: scalar broadcasts are slow)
            cs = compute_shape(tr.shape)
            flat = cs != list(tr.shape)
            g, w32, noise = [b.view(t, cs) if flat and t is not None else t
                             for t in (ctx.estimate.grad[tr.name], ctx.branches.w32[tr.name], noise)]
            new = _next(b, spec, tr, g, w32, noise, numerator, g_max)
            state_out[tr.name] = b.view(b.cast(new, tr.tensor.dtype), tr.shape, hint="next", name=tr.output_name) \
                if flat else b.cast(new, tr.tensor.dtype, hint="next", name=tr.output_name, shape=tr.shape)
    ctx.update = Update(lr_numerator, lr_max, state_out)
    return graph


PASS = Pass("update", run, reads=("trainables", "state", "perturbations", "branches", "estimate"), adds=("update",))
