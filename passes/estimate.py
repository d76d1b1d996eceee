"""estimate: the forward-gradient estimate ĝ, in int32.

    dᵢ = L⁺ᵢ − L⁻ᵢ                        (NaN → 0: a broken pair contributes nothing)
    (the ce loss: dᵢ exact in sign from integers, passes/integer_loss.py, and no tie rule; else in float:)
    dᵢ = 0 where |dᵢ| <= 2^-19 · max(|L⁺ᵢ|, |L⁻ᵢ|)
        (a tie: equal logits can still give losses a few ULPs apart, because the runtime reduces each
        branch at a different memory offset; without the tolerance a tie would move W at random)
    sign (Sign-m-SPSA, default): cᵢ = sign(dᵢ) ∈ {−1, 0, +1}      (a tie dᵢ = 0 gives 0)
    spsa (m-SPSA):                cᵢ = clip(round(gain · dᵢ), −127, 127)
    ĝ = Σᵢ cᵢ · zᵢ                        (--branches loop: summed in a Loop that draws each zᵢ again,
                                          in int8/int16: passes/loop_sum.py)

Only the m scalars cᵢ leave float; ĝ is integer arithmetic end to end.

Precondition: ctx.losses from loss, ctx.perturbations.z (.z_at in the loop form) from prng, ctx.branches.form.
Postcondition: ctx.estimate.grad[name] is [*shape] for each trainable: int32, or in the loop form the
narrowest integer dtype that holds it (int8 or int16, formulas.narrow_grad_dtype; readers widen it);
.coefficients is the int32 [m] tensor of the cᵢ (where the step leaves float).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .context import Context, Estimate, GradRows, Pass
from .formulas import SPSA_CLIP, TIE_TOLERANCE, chunk_rows, chunked, elements_per_word, narrow_grad_dtype
from .graph_ops import Builder
from .integer_loss import LOSS_BITS
from .loop_sum import looped_sum


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    b = Builder(graph, "estimate")
    spec = ctx.spec
    c = _integer_coefficients(b, ctx) if ctx.losses.difference is not None else _float_coefficients(b, ctx)
    if ctx.branches.form == "loop":     # the memory-bounded form never holds all m zᵢ
        rows = _by_rows(ctx, c)
        whole = [tr for tr in ctx.trainables if tr.name not in rows]
        grad = looped_sum(graph, c, spec.m, ctx.perturbations.z_at, whole, narrow_grad_dtype(spec)) if whole else {}
        ctx.estimate = Estimate(c, grad, rows)
        return graph
    c8 = _row(b, c)
    grad = {tr.name: weighted_sum(b, c8, ctx.perturbations.z[tr.name], tr.shape) for tr in ctx.trainables}
    ctx.estimate = Estimate(c, grad)
    return graph


def _float_coefficients(b: Builder, ctx: Context):
    F, spec = b.f32, ctx.spec
    plus, minus = ctx.losses.plus, ctx.losses.minus
    d = F.Sub(plus, minus, hint="d")
    scale = F.Max(F.Abs(plus), F.Abs(minus))
    # one comparison does both: a NaN d (or an Inf loss) compares false, like a tie, and gives 0
    informative = b.op("Greater", [F.Abs(d), F.Mul(scale, TIE_TOLERANCE)], dtype=bool)
    d = F.Where(informative, d, 0.0, hint="d_untied")
    if spec.estimator == "sign":
        c = F.Sign(d)
    else:
        c = F.Clip(F.Round(F.Mul(d, spec.spsa_gain)), float(-SPSA_CLIP), float(SPSA_CLIP))
    return b.cast(c, np.int32, hint="c")


def _integer_coefficients(b: Builder, ctx: Context):
    """From integer_loss's dᵢ (Σ_b of L⁺ − L⁻ on 2^-F nats): sign(dᵢ), or for m-SPSA
    clip(round(f32(dᵢ)·f32(gain·2^-F) / f32(B)), ±127) (the one float division: by the batch size)."""
    d = ctx.losses.difference
    if ctx.spec.estimator == "sign":
        return b.i32.Sign(d, hint="c")
    F = b.f32
    batch = b.cast(b.op("Shape", [ctx.losses.labels], {"start": 0, "end": 1}, dtype=np.int64), np.float32)
    mean = F.Div(F.Mul(b.cast(d, np.float32), np.float32(ctx.spec.spsa_gain * 2.0 ** -LOSS_BITS)), batch)
    return b.cast(F.Clip(F.Round(mean), float(-SPSA_CLIP), float(SPSA_CLIP)), np.int32, hint="c")


def _row(b: Builder, c):
    """The cᵢ as an int8 [1, m] row (|cᵢ| <= SPSA_CLIP = 127)."""
    return b.op("Reshape", [b.cast(c, np.int8, hint="c8"), np.array([1, -1], np.int64)], dtype=np.int8)


def weighted_sum(b: Builder, c8, z, shape):
    """ĝ = Σᵢ cᵢ·zᵢ, int32 [*shape], for the int8 [1, m] row c8 and int8 z [m, ...]: one MatMulInteger
    (int8 in, int32 sums), instead of widening all m·n zᵢ to int32 for a Mul and a ReduceSum."""
    flat = b.op("Reshape", [z, np.array([0, -1], np.int64)], dtype=np.int8)           # [m, n]
    g = b.integer_product("MatMulInteger", c8, flat, hint="g_sum")
    return b.i32.Reshape(g, np.array(list(shape), np.int64), hint="g")


def _by_rows(ctx: Context, c) -> dict[str, GradRows]:
    """The loop form's tensors whose ĝ the update takes a chunk of rows at a time, each chunk summing
    cᵢ·zᵢ over i on its own hash words: those of more than formulas.CHUNK elements whose chunks start on a word,
    unless a later pass needs ĝ whole (momentum's buffer and guided z, kernel norms, sparsity's ranking)."""
    spec = ctx.spec
    if spec.momentum > 0 or spec.sharpness > 0 or spec.kernel_norm or spec.sparsity > 0:
        return {}
    n, rows = elements_per_word(spec), {}
    for tr in ctx.trainables:
        count = chunk_rows(tr.shape, n, spec.m) if chunked(tr.shape) else None
        if count is not None:
            rows[tr.name] = GradRows(count, _chunk_grad(ctx, c, tr, count, n))
    return rows


def _chunk_grad(ctx: Context, c, tr, count: int, n: int):
    words = count * int(np.prod(tr.shape[1:])) // n

    def at(b: Builder, k):
        first = b.cast(b.op("Unsqueeze", [b.op("Mul", [k, np.array(words, np.int64)], dtype=np.int64),
                                          np.array([0], np.int64)], dtype=np.int64), np.int32)
        z = ctx.perturbations.z_words(b, tr.name, first, words)                      # [m, count·inner]
        return weighted_sum(b, _row(b, c), z, [count] + list(tr.shape[1:]))
    return at


PASS = Pass("estimate", run, reads=("trainables", "perturbations", "branches", "losses"), adds=("estimate",))
