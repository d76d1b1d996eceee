"""stack: run the trained suffix once for all 2m branches, with the branches on a new leading axis.

Cloning the suffix per branch (pair's fallback) costs 2m copies of every node; onnxruntime pays a fixed
dispatch cost per node, and on small layers that cost is most of a training step. Stacking keeps one
node per original node: a tensor that depends on the perturbed weights gets the shape [2m, *shape], and
each op is rewritten so that numpy broadcasting carries the branch axis through it:

    elementwise, Q/DQ      stacked inputs of lower rank get size-1 axes after the branch axis
    MatMul                 the same rule on its batch axes (A [B, K] @ W [2m, K, N] -> [2m, B, N])
    Gemm                   becomes Transpose? · MatMul · Mul(alpha)? · Add(beta·C)?
    axis attributes        non-negative axes move by one (Softmax, LayerNormalization, Q/DQ, Transpose,
                           reductions with constant axes)
Any other op (or an unknown rank) makes stack_suffix return None, and pair clones instead.

Precondition: `nodes` in graph order; `stacked` maps the names of the perturbed tensors to their
[2m, *shape] replacements; tensor ranks are known (the pipeline runs shape inference first).
Postcondition: new nodes appended to the graph computing, for every suffix tensor, its [2m, ...] stack;
the original nodes are untouched (the caller removes them).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .graph_ops import Builder

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Relu", "LeakyRelu", "Sigmoid",
               "Tanh", "Erf", "Exp", "Log", "Sqrt", "Neg", "Abs", "Clip", "Cast", "Identity",
               "QuantizeLinear", "DequantizeLinear"}
LAST_AXIS_OPS = {"Softmax", "LogSoftmax", "LayerNormalization"}
REDUCE_OPS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"}


class Unstackable(Exception):
    pass


def _rank(t: gs.Tensor) -> int:
    if isinstance(t, gs.Constant):
        return t.values.ndim
    if t.shape is None:
        raise Unstackable(f"unknown rank of {t.name}")
    return len(t.shape)


def stack_suffix(graph: gs.Graph, nodes: list[gs.Node], stacked: dict[str, gs.Tensor], branches: int):
    """Returns {original tensor name: stacked tensor}, or None when some node cannot be stacked."""
    b = Builder(graph, "stack")
    mark = len(graph.nodes)
    ranks = {}   # stacked tensor name -> rank of the original (unstacked) tensor
    mapping = {}
    for name, t in stacked.items():
        mapping[name] = t
        ranks[t.name] = _rank(t) - 1
    perturbed = {t.name for t in stacked.values()}
    weights = {}   # float output of a perturbed weight's dequantization -> (q, scale, zero point, axis)
    try:
        for node in nodes:
            _stack_node(b, node, mapping, ranks, branches, perturbed, weights)
    except Unstackable:
        del graph.nodes[mark:]
        return None
    return mapping


def _stacked_shape(y: gs.Tensor, out: gs.Tensor, branches: int) -> None:
    y.shape = [branches] + list(out.shape) if out.shape is not None else None


def _times_beta(b: Builder, c: gs.Tensor, beta: float, ranks: dict, dtype) -> gs.Tensor:
    """Gemm's β·C (C itself when β = 1), keeping C's branch rank if C is stacked."""
    if beta == 1.0:
        return c
    y = b.op("Mul", [c, np.array(beta, np.float32)], dtype=dtype)
    if c.name in ranks:
        ranks[y.name] = ranks[c.name]
    return y


def _per_axis(scale: gs.Tensor) -> bool:
    """A 1-D scale of more than one element: per-channel quantization along the node's axis."""
    shape = scale.values.shape if isinstance(scale, gs.Constant) else scale.shape
    return shape is not None and len(shape) == 1 and shape[0] != 1


def _stack_node(b: Builder, node: gs.Node, mapping: dict, ranks: dict, branches: int, perturbed: set,
                weights: dict) -> None:
    ins = [mapping.get(t.name, t) if t is not None and t.name else t for t in node.inputs]
    is_stacked = [t is not None and t.name in ranks for t in ins]
    attrs = dict(node.attrs)
    op = node.op
    out = node.outputs[0]
    if len(node.outputs) != 1:
        raise Unstackable(op)

    def orig_rank(t):
        return ranks[t.name] if t.name in ranks else _rank(t)

    def aligned(inputs, flags, rank):
        """Stacked inputs padded to `rank`+1 so that broadcasting against unstacked ones stays right."""
        res = []
        for t, s in zip(inputs, flags):
            if s and ranks[t.name] < rank:
                axes = np.arange(1, 1 + rank - ranks[t.name], dtype=np.int64)
                t = b.op("Unsqueeze", [t, axes], dtype=t.dtype)
            res.append(t)
        return res

    def emit(op_type, inputs, attrs, rank):
        y = b.op(op_type, inputs, attrs, dtype=out.dtype, hint=f"{node.name}.stacked")
        _stacked_shape(y, out, branches)
        ranks[y.name] = rank
        mapping[out.name] = y
        return y

    def shift_axis(key, default=None):
        axis = attrs.get(key, default)
        if axis is not None and axis >= 0:
            attrs[key] = axis + 1

    present = [t for t in ins if t is not None and t.name]
    if op == "DequantizeLinear" and ins[0].name in perturbed:
        if any(is_stacked[1:]) or attrs.get("block_size", 0):
            raise Unstackable("stacked or blocked quantization parameters")
        axis = attrs.get("axis", 1) if _per_axis(ins[1]) else None
        y = _dequantized(b, ins[0], ins[1], ins[2] if len(ins) > 2 else None, axis, orig_rank(ins[0]), out.dtype)
        weights[y.name] = (ins[0], ins[1], ins[2] if len(ins) > 2 else None, axis)
        _stacked_shape(y, out, branches)
        ranks[y.name] = orig_rank(ins[0])
        mapping[out.name] = y
    elif op in ELEMENTWISE:
        if op in ("QuantizeLinear", "DequantizeLinear"):
            if any(is_stacked[1:]) or attrs.get("block_size", 0):
                raise Unstackable("stacked or blocked quantization parameters")
            if _per_axis(ins[1]):
                shift_axis("axis", 1)
        rank = max(orig_rank(t) for t in present)
        emit(op, aligned(ins, is_stacked, rank), attrs, rank)
    elif op in ("MatMul", "Gemm") and not is_stacked[0] and ins[1].name in weights \
            and _wide(b, node, ins, attrs, weights, ranks, mapping, branches):
        pass
    elif op == "MatMul":
        ra, rb = orig_rank(ins[0]), orig_rank(ins[1])
        if min(ra, rb) < 2:
            raise Unstackable("MatMul with a vector operand")
        rank = max(ra, rb)
        emit(op, aligned(ins, is_stacked, rank), attrs, rank)
    elif op == "Gemm":
        a, w = ins[0], ins[1]
        if attrs.get("transA", 0):
            a = b.op("Transpose", [a], {"perm": [0, 2, 1] if is_stacked[0] else [1, 0]}, dtype=a.dtype)
            if is_stacked[0]:
                ranks[a.name] = 2
        if attrs.get("transB", 0):
            w = _transposed_weight(b, w, is_stacked[1], ranks, weights)
        y = b.op("MatMul", [a, w], dtype=out.dtype)
        ranks[y.name] = 2
        if attrs.get("alpha", 1.0) != 1.0:
            y = b.op("Mul", [y, np.array(attrs["alpha"], np.float32)], dtype=out.dtype)
            ranks[y.name] = 2
        c = ins[2] if len(ins) > 2 and ins[2] is not None and ins[2].name else None
        if c is None:
            mapping[out.name] = y
            _stacked_shape(y, out, branches)
            return
        c = _times_beta(b, c, attrs.get("beta", 1.0), ranks, out.dtype)
        emit("Add", aligned([y, c], [True, c.name in ranks], 2), {}, 2)
    elif op in LAST_AXIS_OPS:
        if any(is_stacked[1:]):
            raise Unstackable(f"stacked {op} parameters")
        shift_axis("axis", -1)
        emit(op, ins, attrs, orig_rank(ins[0]))
    elif op == "Transpose":
        if not is_stacked[0] or "perm" not in attrs:
            raise Unstackable(op)
        attrs["perm"] = [0] + [p + 1 for p in attrs["perm"]]
        emit(op, ins, attrs, orig_rank(ins[0]))
    elif op in REDUCE_OPS:
        if len(ins) < 2 or not isinstance(ins[1], gs.Constant) or ins[1].values.size == 0:
            raise Unstackable(f"{op} without constant axes")
        axes = ins[1].values.astype(np.int64)
        keep = attrs.get("keepdims", 1)
        shifted = np.where(axes >= 0, axes + 1, axes)
        rank = orig_rank(ins[0]) - (0 if keep else len(axes))
        emit(op, [ins[0], shifted] + ins[2:], attrs, rank)
    else:
        raise Unstackable(op)


def _wide(b: Builder, node: gs.Node, ins, attrs, weights, ranks, mapping, branches: int) -> bool:
    """A · W± as one wide product: the 2m weight copies side by side on the output-feature axis,
    A [.., M, K] @ W [K, 2m·N] -> [.., M, 2m·N] -> [2m, .., M, N]. One large GEMM instead of 2m small
    ones, and the perturbed weights keep a plain 2-D DequantizeLinear (per-channel scales tiled), the
    form onnxruntime's QDQ fusion (QGemm, MatMulIntegerToFloat) already handles.
    Returns False (nothing emitted) where the shapes are not known."""
    q, scale, zp, axis = weights[ins[1].name]
    out = node.outputs[0]
    if q.shape is None or len(q.shape) != 3 or not all(isinstance(d, int) for d in q.shape[1:]):
        return False
    a = ins[0]
    ra = _rank(a)
    if ra < 2 or (node.op == "Gemm" and attrs.get("transA", 0)):
        return False
    trans_b = node.op == "Gemm" and attrs.get("transB", 0)
    k, n = (q.shape[2], q.shape[1]) if trans_b else (q.shape[1], q.shape[2])
    if trans_b:   # [2m, N, K] -> [2m·N, K]
        q2 = b.op("Reshape", [q, np.array([branches * n, k], np.int64)], dtype=q.dtype, shape=[branches * n, k])
    else:         # [2m, K, N] -> [K, 2m, N] -> [K, 2m·N]
        q2 = b.op("Reshape", [b.op("Transpose", [q], {"perm": [1, 0, 2]}, dtype=q.dtype),
                              np.array([k, branches * n], np.int64)], dtype=q.dtype, shape=[k, branches * n])
    w2 = _wide_dequantized(b, q2, scale, zp, axis, 0 if trans_b else 1, branches, out.dtype)
    c = ins[2] if node.op == "Gemm" and len(ins) > 2 and ins[2] is not None and ins[2].name else None
    bias = weights.get(c.name) if c is not None else None
    if node.op == "Gemm":
        folded = bias is not None and bias[0].shape is not None and len(bias[0].shape) == 2
        gemm_in = [a, w2]
        if folded:
            qb, sb, zb, ab = bias
            qb2 = b.op("Reshape", [qb, np.array([-1], np.int64)], dtype=qb.dtype, shape=[branches * n])
            gemm_in.append(_wide_dequantized(b, qb2, sb, zb, ab, 0, branches, out.dtype))
            c = None
        y = b.op("Gemm", gemm_in, {key: attrs[key] for key in ("alpha", "beta", "transB") if key in attrs},
                 dtype=out.dtype)
    else:
        y = b.op("MatMul", [a, w2], dtype=out.dtype)
    y = b.op("Reshape", [y, np.array([0] * (ra - 1) + [branches, n], np.int64)], dtype=out.dtype)
    y = b.op("Transpose", [y], {"perm": [ra - 1] + list(range(ra - 1)) + [ra]}, dtype=out.dtype,
             hint=f"{node.name}.stacked")
    ranks[y.name] = ra
    if c is not None:   # an unstacked (frozen) or unfoldable bias: added after, by broadcasting
        c = _times_beta(b, c, attrs.get("beta", 1.0), ranks, out.dtype)
        if c.name in ranks and ranks[c.name] < ra:
            c = b.op("Unsqueeze", [c, np.arange(1, 1 + ra - ranks[c.name], dtype=np.int64)], dtype=c.dtype)
        y = b.op("Add", [y, c], dtype=out.dtype)
        ranks[y.name] = ra
    _stacked_shape(y, out, branches)
    mapping[out.name] = y
    return True


def _wide_dequantized(b: Builder, q2, scale, zp, axis, feature_axis: int, branches: int, dtype):
    """DequantizeLinear of a side-by-side weight ([2m·N, K], [K, 2m·N] or a [2m·N] bias). The layout keeps
    the original axis numbering; per-channel parameters on the feature axis repeat once per branch."""
    if axis is None:
        return b.op("DequantizeLinear", [q2, scale] + ([zp] if zp is not None else []), dtype=dtype)
    axis = axis % len(q2.shape)
    tile = (lambda v: np.tile(v, branches)) if axis == feature_axis else (lambda v: v)
    params = [b.const(tile(scale.values), "scale")] + \
        ([b.const(tile(zp.values), "zero_point")] if zp is not None else [])
    return b.op("DequantizeLinear", [q2] + params, {"axis": axis}, dtype=dtype)


def _dequantized(b: Builder, q, scale, zero_point, axis, rank: int, dtype):
    """(float(q) − zp) · scale for a stacked integer weight [2m, *shape], as Cast/Sub/Mul.

    Not DequantizeLinear: onnxruntime fuses DQ → MatMul into MatMulIntegerToFloat, whose per-channel
    zero point check rejects a stacked [2m, K, N] B at run time. The arithmetic is the same as DQ's
    (the integer difference is exact in float32, then one multiply)."""
    def per_axis(t):
        if axis is None or t.values.ndim == 0:
            return t.values
        a = axis if axis >= 0 else axis + rank
        return t.values.reshape([-1] + [1] * (rank - 1 - a))
    if not isinstance(scale, gs.Constant) or (zero_point is not None and not isinstance(zero_point, gs.Constant)):
        raise Unstackable("quantization parameters computed in-graph")
    x = b.op("Cast", [q], {"to": 1}, dtype=np.float32)
    if zero_point is not None and np.any(zero_point.values != 0):
        x = b.op("Sub", [x, per_axis(zero_point).astype(np.float32)], dtype=np.float32)
    return b.op("Mul", [x, per_axis(scale).astype(np.float32)], dtype=dtype)


def _transposed_weight(b: Builder, w: gs.Tensor, stacked: bool, ranks: dict, weights: dict) -> gs.Tensor:
    """W^T for MatMul. A stacked weight is transposed as integers, before its dequantization: half the
    bytes, and no float Transpose after a DQ for onnxruntime's QDQ optimizer to wrap in a Q/DQ pair."""
    if not stacked:
        return b.op("Transpose", [w], {"perm": [1, 0]}, dtype=w.dtype)
    if w.name in weights:
        q, scale, zp, axis = weights[w.name]
        qt = b.op("Transpose", [q], {"perm": [0, 2, 1]}, dtype=q.dtype)
        if axis is not None:
            axis = {0: 1, 1: 0, -1: -2, -2: -1}[axis]
        out = _dequantized(b, qt, scale, zp, axis, 2, w.dtype)
    else:
        out = b.op("Transpose", [w], {"perm": [0, 2, 1]}, dtype=w.dtype)
    ranks[out.name] = 2
    return out
