"""integer_loss: the ce loss's decisions in integers, so that every runtime takes the same step.

A step reads its losses in three places: the sign (or size) of each branch pair's loss difference
(Sign-m-SPSA, m-SPSA), the sign of each example's difference (--estimator node), and softmax − onehot at the
logits (--estimator head, and node's output layer). In float they come from LogSoftmax and Softmax, whose
exp and log differ between runtimes by an ULP: enough to flip a near-tie (the ONNX reference evaluator and
OpenVINO left onnxruntime's step that way). Here the logits go onto a grid and everything after is integer
arithmetic or one IEEE rounding, the same on every runtime:

    q   = clip(rint(z·2^G), ±2^21)                        int32, G = 10 (logits to ~0.001)
    T[d] = rint(2^P·exp(−d·2^-G)), d = 0..D               the first D where it rounds to 0; C·2^P < 2^24
    example signs  sᵢ,b = sign(R⁺ − R⁻),  R = Σ_c T[o − (q_c − q_y)],  o = max over both branches of q_c − q_y
                   (L = log Σ_c exp(z_c − z_y) is monotone in R: no log needed)
    branch loss    L_b = a·2^(F−G) + round(2^F·(e − P)·ln 2) + LT[⌊S / 2^(e−M)⌋ − 2^M]     on 2^-F nats, F = 16
                   a = min(max q − q_y, 2^16), S = Σ_c T[max q − q_c], e = ⌊log2 S⌋, LT[j] = rint(2^F·ln(1 + j/2^M)),
                   M = 12; L = 2^12·hi + lo, each part summed over the batch apart, then
                   dᵢ = clip(Σhi⁺ − Σhi⁻, ±2048)·2^12 + Σlo⁺ − Σlo⁻    (exact in sign for a batch below 2048)
    error          V = the largest v in −128..127 with (f32(v) − ½)·f32(S) <= f32(128·(E − onehot·S)), E = T[max q − q]
                   (softmax − onehot on 2^-7, rounded half up)
A pair or example with a logit that is not finite decides 0, as a NaN did in float. Every integer stays below
2^24 (OpenVINO computes integer arithmetic through float32) and nothing divides but by a power of two.
bce of one label (a detector) decides likewise: its example signs are sign(z⁺ − z⁻)·(1 − 2y) (the loss is
monotone in z), its branch losses (max(q, 0) − q·y)·2^(F−G) + a softplus table, its error a sigmoid table.
The mse loss, bce of several labels and a class axis of unknown size (or over 2^14 classes) keep the float
decisions.

Measured against the float decisions on digits_cnn and the keyword spotter (30 steps): the example signs agree
on 99.94% of the examples float can decide, and decide a third of those float called a tie; the branch signs
agree on 99.6-99.95% of pairs.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .graph_ops import Builder, Typed, grid_level

LOGIT_BITS, LOSS_BITS, LOG_BITS = 10, 16, 12      # G, F, M above
MAX_CLASSES = 2 ** 14                             # P >= 10: T keeps 10 bits at d = 0
HALF = 4096                                       # the hi/lo split of a branch loss


def applies(loss: str, classes) -> bool:
    """ce over a known number of classes (at most MAX_CLASSES), or bce of one label."""
    return isinstance(classes, int) and (loss == "ce" and 0 < classes <= MAX_CLASSES or loss == "bce" and classes == 1)


def _exp_table(classes: int):
    p = min(20, int(np.floor(np.log2((2 ** 24 - 1) / classes))))
    d = np.arange(int(np.ceil((p + 1) * np.log(2) * 2 ** LOGIT_BITS)) + 1)
    return np.rint(2.0 ** p * np.exp(-d / 2.0 ** LOGIT_BITS)).astype(np.int32), p


def _grid(b: Builder, z):
    """(q int32, finite int32 0/1 per row of the last axis, keepdims)."""
    F = b.f32
    finite = b.op("Less", [F.Abs(z), np.float32(np.inf)], dtype=np.bool_, hint="finite")     # NaN compares false
    q = F.Clip(F.Round(F.Mul(F.Where(finite, z, np.float32(0)), np.float32(2 ** LOGIT_BITS)), hint="grid"),
               np.float32(-2 ** 21), np.float32(2 ** 21))
    rows = b.op("ReduceMin", [b.cast(finite, np.int32), np.array([-1], np.int64)], {"keepdims": 1}, dtype=np.int32)
    return b.cast(q, np.int32, hint="q"), rows


def _lookup(b: Builder, table: np.ndarray, index, hint: str):
    """table[index] (int32, index's shape), gathered from flattened indices: the ONNX reference evaluator of
    onnx 1.16 fails on indices that are not C-contiguous (a transposed branch axis leaves them so)."""
    flat = b.op("Reshape", [index, np.array([-1], np.int64)], dtype=np.int32)
    taken = b.op("Gather", [b.const(table, hint + "_table"), flat], {"axis": 0}, dtype=np.int32, hint=hint)
    return b.op("Reshape", [taken, b.op("Shape", [index], dtype=np.int64)], dtype=np.int32)


def _exps(b: Builder, table: np.ndarray, gap):
    """T[min(gap, D)]."""
    return _lookup(b, table, b.i32.Min(gap, np.int32(len(table) - 1)), "exp")


def _sum(b: Builder, x, axis: int, keepdims=0):
    return b.op("ReduceSum", [x, np.array([axis], np.int64)], {"keepdims": keepdims}, dtype=np.int32)


def _max(b: Builder, x, axis: int = -1):
    return b.op("ReduceMax", [x, np.array([axis], np.int64)], {"keepdims": 1}, dtype=np.int32)


def _at_label(b: Builder, x, labels, bx: int, classes: int):
    """x at each example's label, int32 [n, B, 1] (bx 0) or [B, n, 1] (bx 1), for int32 x [.., .., C]: a sum
    of x·onehot (the ONNX reference evaluator's GatherElements takes at most 64 classes)."""
    hit = b.op("Equal", [b.op("Unsqueeze", [labels, np.array([1], np.int64)], dtype=np.int64),
                         np.arange(classes, dtype=np.int64)], dtype=np.bool_)
    onehot = b.i32.Unsqueeze(b.cast(hit, np.int32), np.array([bx], np.int64))
    return _sum(b, b.i32.Mul(x, onehot), 2, keepdims=1)


def _halves(b: Builder, x, bx: int, m: int):
    """The plus and minus branches of x along the branch axis bx."""
    cut = lambda lo, hi: b.op("Slice", [x, np.array([lo], np.int64), np.array([hi], np.int64),
                                         np.array([bx], np.int64)], dtype=x.dtype)
    return cut(0, m), cut(m, 2 * m)


def example_signs(b: Builder, logits, labels, m: int, bx: int, classes: int, loss: str = "ce"):
    """sᵢ,b, int32 [m, B], of the 2m stacked branches' logits [2m, B, C] (bx 0) or [B, 2m, C] (bx 1)."""
    if loss == "bce":
        return _bce_signs(b, logits, labels, m, bx)
    I = b.i32
    table, _ = _exp_table(classes)
    q, finite = _grid(b, logits)
    r = I.Sub(q, _at_label(b, q, labels, bx, classes), hint="r")
    (rp, rm), (fp, fm) = _halves(b, r, bx, m), _halves(b, finite, bx, m)
    o = I.Max(_max(b, rp), _max(b, rm), hint="o")
    total = lambda x: _sum(b, _exps(b, table, I.Sub(o, x)), 2)
    s = I.Mul(I.Sign(I.Sub(total(rp), total(rm))), I.Squeeze(I.Mul(fp, fm), np.array([2], np.int64)), hint="s")
    return s if bx == 0 else I.Transpose(s, perm=[1, 0])


def _bce_signs(b: Builder, logits, labels, m: int, bx: int):
    """One label: the loss falls with z where y = 1 and rises where y = 0, so sᵢ,b = sign(z⁺ − z⁻)·(1 − 2y),
    by two comparisons of the float logits (no grid); 0 where either is not finite."""
    I = b.i32
    _, finite = _grid(b, logits)
    (zp, zm), (fp, fm) = _halves(b, logits, bx, m), _halves(b, finite, bx, m)
    order = I.Sub(b.cast(b.op("Greater", [zp, zm], dtype=np.bool_), np.int32),
                  b.cast(b.op("Less", [zp, zm], dtype=np.bool_), np.int32), hint="order")
    sense = I.Sub(np.int32(1), I.Mul(b.cast(labels, np.int32), np.int32(2)))                # [B]: 1 − 2y
    sense = I.Unsqueeze(sense, np.array([bx, 2], np.int64))                           # beside the branches
    s = I.Squeeze(I.Mul(I.Mul(order, sense), I.Mul(fp, fm)), np.array([2], np.int64), hint="s")
    return s if bx == 0 else I.Transpose(s, perm=[1, 0])


def _softplus_table():
    j = np.arange(int(np.ceil((LOSS_BITS + 1) * np.log(2) * 2 ** LOGIT_BITS)) + 1)
    return np.rint(2.0 ** LOSS_BITS * np.log1p(np.exp(-j / 2.0 ** LOGIT_BITS))).astype(np.int32)


def _fixed_bce_losses(b: Builder, logits, labels, bx: int):
    """(L int32 [n, B] or [B, n] on 2^-F nats, finite 0/1) of one label's bce:
    (max(q, 0) − q·y)·2^(F−G) + SP[min(|q|, D)], q clipped to ±2^16 (every value below 2^23)."""
    I = b.i32
    q, finite = _grid(b, logits)
    q = I.Clip(q, np.int32(-2 ** 16), np.int32(2 ** 16))
    table = _softplus_table()
    softplus = _lookup(b, table, I.Min(I.Abs(q), np.int32(len(table) - 1)), "softplus")
    y = I.Unsqueeze(b.cast(labels, np.int32), np.array([bx, 2], np.int64))
    linear = I.Mul(I.Sub(I.Max(q, np.int32(0)), I.Mul(q, y)), np.int32(2 ** (LOSS_BITS - LOGIT_BITS)))
    ok = I.Squeeze(finite, np.array([2], np.int64))
    return I.Mul(I.Squeeze(I.Add(linear, softplus), np.array([2], np.int64)), ok, hint="fixed_loss"), ok


def _fixed_losses(b: Builder, logits, labels, bx: int, n: int, classes: int):
    """(L int32 [n, B] or [B, n] on 2^-F nats, finite 0/1 of the same shape)."""
    I = b.i32
    table, p = _exp_table(classes)
    bits = min(LOG_BITS, p)
    q, finite = _grid(b, logits)
    gap = I.Sub(_max(b, q), q, hint="gap")
    S = _sum(b, _exps(b, table, gap), 2)
    powers = 2 ** np.arange(1, 24, dtype=np.int32)
    e = _sum(b, b.cast(b.op("GreaterOrEqual", [I.Unsqueeze(S, np.array([-1], np.int64)), powers], dtype=np.bool_),
                       np.int32), -1)                                                       # ⌊log2 S⌋
    mantissa = I.Div(S, _lookup(b, 2 ** np.arange(24 - bits, dtype=np.int32), I.Sub(e, np.int32(bits)), "powers"),
                     hint="mantissa")
    ln2 = np.rint(2.0 ** LOSS_BITS * (np.arange(24) - p) * np.log(2)).astype(np.int32)
    lt = np.rint(2.0 ** LOSS_BITS * np.log1p(np.arange(2 ** bits) / 2.0 ** bits)).astype(np.int32)
    lg = I.Add(_lookup(b, ln2, e, "ln2"), _lookup(b, lt, I.Sub(mantissa, np.int32(2 ** bits)), "log"), hint="log")
    a = I.Min(I.Squeeze(_at_label(b, gap, labels, bx, classes), np.array([2], np.int64)), np.int32(2 ** 16))
    ok = I.Squeeze(finite, np.array([2], np.int64))
    return I.Mul(I.Add(I.Mul(a, np.int32(2 ** (LOSS_BITS - LOGIT_BITS))), lg), ok, hint="fixed_loss"), ok


def branch_differences(b: Builder, logits, labels, m: int, bx: int, classes: int, loss: str = "ce"):
    """dᵢ, int32 [m]: Σ_b (L⁺ − L⁻) exact in sign (0 for a pair with a logit that is not finite)."""
    I = b.i32
    L, ok = _fixed_losses(b, logits, labels, bx, 2 * m, classes) if loss == "ce" else \
        _fixed_bce_losses(b, logits, labels, bx)
    hi = I.Div(L, np.int32(HALF), hint="hi")
    lo = I.Sub(L, I.Mul(hi, np.int32(HALF)), hint="lo")
    batch = 1 - bx
    sums = [_halves(b, _sum(b, x, batch), 0, m) for x in (hi, lo)]
    d_hi = I.Clip(I.Sub(*sums[0]), np.int32(-2048), np.int32(2048))
    d = I.Add(I.Mul(d_hi, np.int32(HALF)), I.Sub(*sums[1]), hint="d")
    whole = _halves(b, b.op("ReduceMin", [ok, np.array([batch], np.int64)], {"keepdims": 0}, dtype=np.int32), 0, m)
    return I.Mul(d, I.Mul(*whole), hint="d_integer")


def sigmoid_error(b: Builder, logits, labels):
    """V = sigmoid(z) − y on 2^-7, int8 [B, 1], for one label's logits [B, 1] and labels [B]: a table of
    rint(128·σ(j·2^-G)) over the grid, clipped where it reaches 0 and 128 (0 where z is not finite)."""
    I = b.i32
    reach = int(np.ceil(np.log(255) * 2 ** LOGIT_BITS)) + 1
    table = np.rint(128 / (1 + np.exp(-np.arange(-reach, reach + 1) / 2.0 ** LOGIT_BITS))).astype(np.int32)
    q, finite = _grid(b, logits)
    p = _lookup(b, table, I.Add(I.Clip(q, np.int32(-reach), np.int32(reach)), np.int32(reach)), "sigmoid")
    y = I.Unsqueeze(b.cast(labels, np.int32), np.array([1], np.int64))
    v = I.Min(I.Sub(p, I.Mul(y, np.int32(128))), np.int32(127))
    return b.cast(I.Mul(v, finite), np.int8, hint="v")


def softmax_error(b: Builder, logits, labels):
    """V = softmax(z) − onehot(y) on 2^-7, int8 [B, C], for logits [B, C] and labels [B] (0 for an example
    with a logit that is not finite)."""
    I, F = b.i32, b.f32
    classes = int(logits.shape[-1])
    table, _ = _exp_table(classes)
    q, finite = _grid(b, logits)
    E = _exps(b, table, I.Sub(_max(b, q), q))
    S = _sum(b, E, -1, keepdims=1)
    hit = b.op("Equal", [b.op("Unsqueeze", [labels, np.array([1], np.int64)], dtype=np.int64),
                         np.arange(classes, dtype=np.int64)], dtype=np.bool_)
    e = I.Sub(E, I.Mul(b.cast(hit, np.int32), S), hint="e")
    e128, s = F.Mul(b.cast(e, np.float32), np.float32(128)), b.cast(S, np.float32)
    below = lambda v: b.op("LessOrEqual", [F.Mul(F.Sub(b.cast(v, np.float32), np.float32(0.5)), s), e128],
                           dtype=np.bool_, hint="below")
    v = grid_level(b, -128, 127, F.Add(F.Div(e128, s), np.float32(0.5), hint="approx"), below)
    return b.cast(I.Mul(v, finite), np.int8, hint="v")
