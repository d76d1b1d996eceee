"""precondition: whiten the input of each trained Gemm/MatMul with a frozen, function-preserving transform.

A trained layer's input features are far from white (a few directions dominate), so random ±ε·z
directions mostly probe flat ones. With calibration inputs (compile time, float64):

    M  = E[a aᵀ]                         a: rows of the trained node's input (uncentred second moment)
    P  = (M / (tr M / K) + λ·I)^(−1/2)   symmetric (ZCA), λ = 1e-3 (node's step: 0.1); stored as float32
    a' = a · P                           one float MatMul in the frozen prefix, shared by every branch
    W' = P⁻¹ · W                         (W as K×N: input features × output channels)
    s'_c = max_k |W'_kc| / (F · qmax)    per output channel (F, qmax: the training grid of widen)
    W'_t = clip(round_half_away(W' / s'), qmin, qmax)

so a'·W' = a·W up to the rounding of W' on the training grid. The perturbations and the integer update
act on W'_t; export folds P back (W = P · W') and re-quantizes to the deployed grid. The second moment is
uncentred so the bias needs no change: the mean direction is whitened like any other.

Precondition: ctx.trainables after widen (their qmin/qmax/factor final); ctx.calibration float32 inputs
(or None).
Postcondition: ctx.preconditioned is set (empty when nothing was whitened); each trained weight of a
Gemm (transA = 0) or MatMul with a 2-D weight is W'_t with scale s'; its node reads a·P;
ctx.preconditioned holds one contract entry per such site. A site downstream of another trained weight
is whitened too: its a·P node lies in the trained suffix, and pair carries it onto the branches like any
frozen op. Other sites are unchanged. Without calibration data, or (precondition "auto") without an
eligible site, the graph is unchanged. Under --estimator node (or head) the weights are not reparametrized:
ctx.step_whitening holds (StepWhitening, W_hi, W_lo − 128, d constants: integer_whitening) per trained
Gemm/MatMul site and per group-1 2-D Conv,
whose rows are its im2col patches (K = C·kh·kw, P² per channel: P_c² ⊗ I); ctx.preconditioned is empty.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fgcompile.artifact import StepWhitening, Whitening
from fgcompile.errors import CompileError
from fgcompile.grid import round_half_away
from fgcompile.session import make_session
from fgcompile.spec import READS_ACTIVATIONS
from .context import Context, Pass
from .formulas import Patches, bias_stride
from .graph_ops import Builder

RIDGE = 1e-3
# --estimator node's step P² scales its noise up by as much as 1/λ along the directions the inputs barely span
# (P, which weight perturbation's reparametrized weight takes, by 1/√λ): λ = 1e-3 trained digits_cnn --last 2 to
# 68-71% (30 epochs, test split, best rate), 0.01 to 83-94%, 0.1 to 97.5%, 0.3 to 97.0% (2 seeds each)
STEP_RIDGE = 0.1
STEP_RMS = 32     # the int8 value of the rms of a·P² (--estimator node's whitened step)
QMAX = {"int8": 127, "int16": 32767}


def whitening(a: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """P = (M / (tr M / K) + λ I)^(−1/2) of rows a [N, K], float64."""
    m = a.T @ a / len(a)
    m = m / max(np.trace(m) / len(m), 1e-30) + ridge * np.eye(len(m))
    vals, vecs = np.linalg.eigh(m)
    return (vecs / np.sqrt(vals)) @ vecs.T


def _activations(graph: gs.Graph, ctx: Context, names: list[str]) -> dict[str, np.ndarray]:
    """The float values of `names` on the calibration inputs, [N, …] (float64)."""
    probe = graph.copy()
    tensors = probe.tensors()
    probe.outputs = [tensors[n] for n in names]
    for t in probe.outputs:
        t.dtype = np.float32
    probe.cleanup()
    sess = make_session(gs.export_onnx(probe))
    x = np.asarray(ctx.calibration, np.float32)
    fixed = next((t.shape[0] for t in probe.inputs if t.name == ctx.io.data_input and t.shape), None)
    step = fixed if isinstance(fixed, int) and fixed > 0 else 256
    end = len(x) - len(x) % step if step == fixed else len(x)   # whole batches where the model fixes one
    runs = [sess.run(names, {ctx.io.data_input: x[i:i + step]}) for i in range(0, end, step)]
    return {n: np.concatenate([r[k] for r in runs]).astype(np.float64) for k, n in enumerate(names)}


def _rows(a: np.ndarray, node: gs.Node) -> np.ndarray:
    """The rows [N·…, K] a trained site multiplies by its weight: a Conv's im2col patches [N·H'·W', C·kh·kw],
    else the rows of its last axis."""
    if node.op == "Conv":
        return Patches.of_conv(node.attrs, node.inputs[1].shape).rows(a)
    return a.reshape(-1, a.shape[-1])


def _layout(node: gs.Node, tensor) -> str | None:
    """The weight layout of a site that can be preconditioned: "kn" (K×N) or "nk" (Gemm transB), else None.
    Per-channel scales must run along the output channels N."""
    if len(tensor.shape) != 2:
        return None
    if node.op == "MatMul" or node.op == "Gemm" and not node.attrs.get("transA", 0):
        layout = "nk" if node.op == "Gemm" and node.attrs.get("transB", 0) else "kn"
        return layout if tensor.axis in (None, 0 if layout == "nk" else 1) else None
    return None


def _requantize(w_kn: np.ndarray, p: np.ndarray, per_channel: bool, qmax: int, qmin_t: int, qmax_t: int):
    """(W'_t as K×N floats on the grid, s') for W' = P⁻¹·W."""
    w_new = np.linalg.inv(p.astype(np.float64)) @ w_kn
    peak = np.abs(w_new).max(axis=0) if per_channel else np.abs(w_new).max(keepdims=True)
    s_new = (np.maximum(peak, 1e-30) / qmax).astype(np.float32)
    return np.clip(round_half_away(w_new / s_new.astype(np.float64)), qmin_t, qmax_t), s_new


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    ctx.preconditioned = []
    ctx.step_whitening = []
    nodes = {n.name: n for n in graph.nodes}
    chosen = [(t, nodes[t.site]) for t in ctx.trainables if t.role == "weight"]
    chosen = [(t, node, _layout(node, t.tensor)) for t, node in chosen]
    chosen = [c for c in chosen if c[2] is not None]
    if ctx.spec.estimator == "node":   # its step is whitened on a group-1 2-D Conv's patches too
        chosen += [(t, node, "conv") for t, node in ((t, nodes[t.site]) for t in ctx.trainables if t.role == "weight")
                   if node.op == "Conv" and node.attrs.get("group", 1) == 1 and len(t.tensor.shape) == 4]
    if ctx.calibration is None:
        if chosen and ctx.spec.precondition == "auto":   # the user may not know what they left out
            ctx.notes.append("whitening is off: --precondition auto whitens a trained Gemm/MatMul's input only "
                             "with calibration inputs. Pass --calibration TRAIN.npz (the training data): whitened "
                             "inputs let the sign steps train faster and further (README: Whitened input)")
        return graph
    tensors = graph.tensors()
    if not chosen and ctx.spec.precondition == "auto":
        return graph
    if not chosen:
        raise CompileError("--precondition whiten: no trained weight is a Gemm or MatMul with a 2-D weight "
                           "(scaled per output channel); compile with "
                           "--precondition none.")
    acts = _activations(graph, ctx, [node.inputs[0].name for _, node, _ in chosen])
    if ctx.spec.estimator in READS_ACTIVATIONS:    # their step reads the input: whitened there, ΔW ∝ P²·ĝ
        return _step_whitening(graph, ctx, chosen, acts)
    b = Builder(graph, "precondition")
    for t, node, layout in chosen:
        a = node.inputs[0]
        p = whitening(_rows(acts[a.name], node)).astype(np.float32)
        dq = node.inputs[1].inputs[0]
        s = np.asarray(tensors[t.tensor.scale_name].values, np.float32)
        w = tensors[t.name].values.astype(np.float64) * (s.reshape(-1, 1) if layout == "nk" and s.size > 1 else s)
        q, s_new = _requantize(w.T if layout == "nk" else w, p, s.size > 1, QMAX[t.source_dtype] * t.factor,
                               t.qmin, t.qmax)
        scale_name = f"{t.tensor.scale_name}__pre"
        dq.inputs[0] = gs.Constant(t.name, (q.T if layout == "nk" else q).astype(t.tensor.dtype))
        dq.inputs[1] = gs.Constant(scale_name, s_new.reshape(s.shape))
        t.tensor.scale_name = scale_name
        matrix = gs.Constant(f"{t.name}__whitening", p)
        node.inputs[0] = b.op("MatMul", [a, matrix], dtype=np.float32, shape=a.shape, hint="whitened")
        for bias in ctx.trainables:   # a bias stride is sized by its weight's scale
            if bias.role == "bias" and bias.site == t.site and bias.tensor.dtype == "int32":
                bias.stride = bias_stride(s_new, tensors[bias.tensor.scale_name].values)
        ctx.preconditioned.append(Whitening(t.site, t.name, a.name, matrix.name, layout, RIDGE,
                                            [float(v) for v in s_new.ravel()]))
    return graph


def _step_whitening(graph: gs.Graph, ctx: Context, chosen, acts) -> gs.Graph:
    """--estimator node: the weights stay on their deployed grid and the step is preconditioned instead,
    ΔW ∝ P²·ĝ_W: the node estimator correlates its noise with a' ≈ quantize(a·P², s) (int8), s = rms(a·P²)/32
    over the calibration rows (saturating past 4 rms: max/127 left the typical a' at a few LSBs, since the
    whitened rows' max is ~18 rms on digits_cnn; measured 73% at 30 epochs against 83% unwhitened, at λ = 1e-3).
    A group-1 Conv's rows are its im2col patches [N·H'·W', C·kh·kw], and its P² is per channel,
    P² = P_c² ⊗ I_(kh·kw) with P_c from the input's channel second moment [C]² (every pixel a row): on
    digits_cnn --last 3 (30 epochs, 3 seeds, ĝ a mean over positions) it trained to 97.5%, the full patch
    covariance [C·kh·kw]² to 96.9%, conv2 unwhitened to 94.4% (benchmarks/README.md). P² becomes the integer
    planes of integer_whitening on the integer input (P²·s_in/s: a' from q − z), so that a' is the same on every
    runtime ([C, C] for a Conv, applied to each kernel tap; one 7-bit plane instead of two lost 2 points of test
    accuracy on digits_cnn --last 3, benchmarks/README.md). Only records it, with those constants (passes/node.py builds the nodes)."""
    for t, node, layout in chosen:
        raw = acts[node.inputs[0].name]
        a = _rows(raw, node)
        if layout == "conv":
            p_c = whitening(raw.transpose(0, 2, 3, 1).reshape(-1, raw.shape[1]), STEP_RIDGE)
            p2 = p_c @ p_c
            white = (a.reshape(len(a), raw.shape[1], -1).transpose(0, 2, 1) @ p2).reshape(len(a), -1)
        else:
            p = whitening(a, STEP_RIDGE)
            p2 = p @ p
            white = a @ p2
        scale = float(np.float32(max(np.sqrt((white ** 2).mean()), 1e-30) / STEP_RMS))
        dq = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if dq is None or dq.op != "DequantizeLinear" or not isinstance(dq.inputs[1], gs.Constant) or \
                dq.inputs[1].values.size != 1:
            continue        # not an integer input: node perturbation refuses the site itself
        hi, lo, divisors = integer_whitening(p2 * (float(dq.inputs[1].values.reshape(())) / scale))
        hi, lo, divisors = (gs.Constant(f"{t.name}__step_whitening{suffix}", v)
                            for suffix, v in (("", hi), ("_low", lo), ("_divisors", divisors)))
        ctx.step_whitening.append((StepWhitening(t.site, node.inputs[0].name, hi.name, scale, lo.name,
                                                 divisors.name), hi, lo, divisors))
    return graph


def integer_whitening(m: np.ndarray):
    """(W_hi, W_lo − 128, d): M ≈ W/d per column, W = 256·W_hi + W_lo int16 (W_hi = ⌊W/256⌋ and W_lo − 128 int8,
    MatMulInteger's planes), W = clip(rint(M·d)), d_j = 2^k_j, k_j = clip(⌊log2(32767 / max_i |M_ij|)⌋, 8, 22): a
    column keeps 15 bits, and d >= 256 lets passes/node.py divide the two planes' sums apart."""
    top = np.maximum(np.abs(m).max(axis=0), 1e-30)
    d = 2.0 ** np.clip(np.floor(np.log2(32767 / top)), 8, 22)
    w = np.clip(np.rint(m * d), -32768, 32767).astype(np.int64)
    hi = np.floor_divide(w, 256)
    return hi.astype(np.int8), (w - 256 * hi - 128).astype(np.int8), d.astype(np.int32)


PASS = Pass("precondition", run, reads=("io", "trainables"), adds=("preconditioned", "step_whitening"))
