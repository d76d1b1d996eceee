"""branch_rules: run the trained suffix once for all 2m branches, with one rule per op family.

Cloning the suffix per branch (pair's fallback) costs 2m copies of every node; onnxruntime pays a fixed
dispatch cost per node, and on small layers that cost is most of a training step. Branching keeps one
node per original node; a tensor that depends on the perturbed weights is folded [2m·B, ...] or leading
[2m, B, ...] (passes/branch_axis.py). RULES maps an op to its rule, as JAX's primitive_batchers:

    elementwise, Q/DQ      folded when every other operand broadcasts below the batch axis; else leading,
                           with branched inputs of lower rank padded after the branch axis
    DQ of a perturbed W    (float(q) − zp)·scale, kept lazy for the wide product
    batch-wise             (Conv on frozen weights, pooling, Flatten, Resize, ...) folded
    Reshape, Transpose,    folded when the batch axis stays the leading one; else leading (Reshape
    Concat, Squeeze, ...   prepends 2m, axes move by one)
    Softmax, LayerNorm,    folded when they do not reduce over the batch axis; else leading
    reductions
    MatMul / Gemm          frozen B: folded; a perturbed B: one wide product (passes/wide_product.py);
                           two branched operands: a batched MatMul on the leading axis
    Expand                 leading, to [2m, *shape] (the prompt tokens of passes/prompts.py)
    Conv, perturbed W      one Conv per branch kernel on that branch's rows of the folded batch (or on
                           the shared unbranched input), concatenated on the batch axis
Any other op (or a case a rule cannot carry) is a Refusal that names the node, the op and why; pair then
clones, and the contract records the reason.

Precondition: `nodes` in graph order; `stacked` maps the names of the perturbed tensors to their
[2m, *shape] replacements; tensor shapes are known (the pipeline runs shape inference first).
Postcondition: new nodes appended to the graph computing, for every suffix tensor, its branched form; the
returned mapping gives the loss tap in the leading form [2m, B, ...]; the original nodes are untouched.
On a Refusal nothing is added.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from .branch_axis import BranchedTensors, Unstackable, optional, per_axis, per_tensor_dq, rank
from .graph_ops import Builder
from .wide_product import wide_product


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why the suffix cannot run on a branch axis."""
    node: str
    op: str
    why: str

    def __str__(self) -> str:
        return f"node {self.node!r} ({self.op}): {self.why}"


def stack_suffix(graph: gs.Graph, nodes: list[gs.Node], stacked: dict[str, gs.Tensor], branches: int,
                 tap: str, parts: dict | None = None) -> dict[str, gs.Tensor] | Refusal:
    """{original tensor name: branched tensor} with [tap] in the leading form, or the Refusal. `parts`:
    {stacked tensor name: part(b, k, lo, hi)} for a weight whose branch k (output channels lo:hi of it,
    the loop form's pieces, _output_pieces) a trained Conv can build alone."""
    s = BranchedTensors(graph, stacked, branches, {id(n) for n in nodes}, parts)
    mark = len(graph.nodes)
    for node in nodes:
        if node.outputs[0].name in s.mapping:     # made already (a Conv emitted its QuantizeLinear)
            continue
        try:
            _branched(s, node)
        except Unstackable as exc:
            del graph.nodes[mark:]
            return Refusal(node.name, node.op, str(exc))
    try:
        s.mapping[tap] = s.lead(s.mapping[tap])
    except Unstackable as exc:
        del graph.nodes[mark:]
        return Refusal(tap, "loss tap", str(exc))
    return s.mapping


def _branched(s: BranchedTensors, node: gs.Node) -> None:
    if len(node.outputs) != 1:
        raise Unstackable(f"{len(node.outputs)} outputs")
    rule = RULES.get(node.op)
    if rule is None:
        raise Unstackable("no branch-axis rule for this op")
    rule(s, node, [s.mapping.get(t.name, t) if t is not None and t.name else None for t in node.inputs],
         dict(node.attrs))


def elementwise(s: BranchedTensors, node, ins, attrs):
    if node.op in ("QuantizeLinear", "DequantizeLinear"):
        _plain_quantization(s, ins, attrs)
    out_rank = max(s.rank(t) for t in ins if t is not None)
    foldable = all((s.stacked(t) and t.name in s.folded and s.ranks[t.name] == out_rank) if s.stacked(t)
                   else s.below_batch(t, out_rank) for t in ins if t is not None) and out_rank > 0
    if foldable:
        s.emit(node, node.op, ins, attrs, folded=True)
    else:
        s.leading_elementwise(node, ins, attrs)


def _plain_quantization(s: BranchedTensors, ins, attrs):
    if any(s.stacked(t) for t in ins[1:]) or attrs.get("block_size", 0):
        raise Unstackable("stacked or blocked quantization parameters")


def dequantize(s: BranchedTensors, node, ins, attrs):
    """DQ of a perturbed [2m, *shape] weight: (float(q) − zp)·scale, kept lazy for the wide products;
    any other DQ is elementwise."""
    if ins[0].name not in s.perturbed:
        return elementwise(s, node, ins, attrs)
    _plain_quantization(s, ins, attrs)
    axis = attrs.get("axis", 1) if per_axis(ins[1]) else None
    zp = optional(ins, 2)
    y = _dequantized(s.b, ins[0], ins[1], zp, axis, s.rank(ins[0]), node.outputs[0].dtype)
    s.dequantized[y.name] = (ins[0], ins[1], zp, axis)
    s.register(y, s.shapes[ins[0].name], folded=False)
    s.mapping[node.outputs[0].name] = y


def _only_first_stacked(s: BranchedTensors, ins, op):
    if not s.stacked(ins[0]) or any(s.stacked(t) for t in ins[1:]):
        raise Unstackable(f"{op} with a stacked parameter")


def batchwise(s: BranchedTensors, node, ins, attrs):
    _only_first_stacked(s, ins, node.op)
    if node.op == "Flatten" and attrs.get("axis", 1) == 0:
        raise Unstackable("Flatten(axis=0) merges the batch axis")
    if node.op == "Resize" and len(ins) > 3 and ins[3] is not None:
        raise Unstackable("Resize by sizes (batch size included)")
    s.emit(node, node.op, [s.fold(ins[0])] + ins[1:], attrs, folded=True)


def conv(s: BranchedTensors, node, ins, attrs):
    return _trained_conv(s, node, ins) if s.stacked(ins[1]) else batchwise(s, node, ins, attrs)


def reshape(s: BranchedTensors, node, ins, attrs):
    _only_first_stacked(s, ins, "Reshape")
    if not isinstance(ins[1], gs.Constant):
        raise Unstackable("Reshape to a computed shape")
    shape = [int(v) for v in ins[1].values]
    if attrs.get("allowzero", 0) and 0 in shape:
        raise Unstackable("Reshape with allowzero")
    if shape and (shape[0] == 0 or shape[0] == -1 or -1 not in shape[1:]):
        shape[0] = 0 if shape[0] == 0 else -1      # the batch axis absorbs the 2m branches
        s.emit(node, "Reshape", [s.fold(ins[0]), np.array(shape, np.int64)], attrs, folded=True)
    else:   # on the leading form a 0 still copies the same (shifted) input axis
        s.emit(node, "Reshape", [s.lead(ins[0]), np.array([s.n] + shape, np.int64)], attrs, folded=False)


def expand(s: BranchedTensors, node, ins, attrs):
    """Expand(X, shape) as Expand(X', [2m, *shape]): X' is X on the leading form, padded after the branch
    axis to the output's rank (a broadcast moves no axis, so the branch axis stays first)."""
    _only_first_stacked(s, ins, "Expand")
    out = node.outputs[0].shape
    if out is None:
        raise Unstackable("unknown rank")
    target = s.b.op("Concat", [np.array([s.n], np.int64), ins[1]], {"axis": 0}, dtype=np.int64)
    s.emit(node, "Expand", [s.padded(s.lead(ins[0]), len(out)), target], attrs, folded=False)


def transpose(s: BranchedTensors, node, ins, attrs):
    _only_first_stacked(s, ins, "Transpose")
    perm = attrs.get("perm", list(range(s.rank(ins[0])))[::-1])
    if perm[0] == 0:
        s.emit(node, "Transpose", [s.fold(ins[0])], {"perm": perm}, folded=True)
    else:
        s.emit(node, "Transpose", [s.lead(ins[0])], {"perm": [0] + [p + 1 for p in perm]}, folded=False)


def axis_op(s: BranchedTensors, node, ins, attrs):
    """Ops with one `axis` attribute: Softmax, LayerNormalization, Concat, Gather."""
    op = node.op
    if op == "Concat":
        whole = all(s.stacked(t) for t in ins)
    else:
        _only_first_stacked(s, ins, op)
        whole = True
    axis = attrs.get("axis", 0 if op in ("Concat", "Gather") else -1)
    axis = axis + s.rank(ins[0]) if axis < 0 else axis
    if whole and axis >= 1:
        s.emit(node, op, [s.fold(t) if s.stacked(t) else t for t in ins], attrs, folded=True)
        return
    attrs["axis"] = axis + 1
    if op == "Concat":     # an unbranched operand is repeated for every branch
        ins = [s.lead(t) if s.stacked(t) else s.b.op("Expand", [
            s.b.op("Unsqueeze", [t, np.array([0], np.int64)], dtype=t.dtype),
            np.array([s.n] + [1] * rank(t), np.int64)], dtype=t.dtype) for t in ins]
    else:
        ins = [s.lead(ins[0])] + ins[1:]
    s.emit(node, op, ins, attrs, folded=False)


def _moved_axes(s: BranchedTensors, node, ins, attrs, axes_rank: int):
    """Reduce/Squeeze/Unsqueeze with constant axes: folded when axis 0 (the batch) is not among them,
    else leading with every axis moved by one."""
    axes = [a + axes_rank if a < 0 else a for a in (int(a) for a in ins[1].values)]
    if 0 not in axes:
        s.emit(node, node.op, [s.fold(ins[0]), np.array(axes, np.int64)] + ins[2:], attrs, folded=True)
    else:
        s.emit(node, node.op, [s.lead(ins[0]), np.array([a + 1 for a in axes], np.int64)] + ins[2:], attrs,
               folded=False)


def reduce(s: BranchedTensors, node, ins, attrs):
    if len(ins) < 2 or not isinstance(ins[1], gs.Constant) or ins[1].values.size == 0:
        raise Unstackable("reduction without constant axes")
    _only_first_stacked(s, ins, node.op)
    _moved_axes(s, node, ins, attrs, s.rank(ins[0]))


def squeeze(s: BranchedTensors, node, ins, attrs):
    _only_first_stacked(s, ins, node.op)
    if len(ins) < 2 or not isinstance(ins[1], gs.Constant):
        raise Unstackable(f"{node.op} without constant axes")
    if node.outputs[0].shape is None:
        raise Unstackable("unknown rank")
    _moved_axes(s, node, ins[:2], attrs, s.rank(ins[0]) if node.op == "Squeeze" else len(node.outputs[0].shape))


def matmul(s: BranchedTensors, node, ins, attrs):
    a, w = ins[0], ins[1]
    if not s.stacked(a) and w.name in s.dequantized and wide_product(s, node, ins, attrs):
        return
    if s.stacked(a) and a.name in s.folded and not s.stacked(w) and rank(w) <= 2 or \
            s.stacked(a) and s.stacked(w) and a.name in s.folded and w.name in s.folded and s.rank(a) >= 3 \
            and s.rank(a) == s.rank(w):
        s.emit(node, "MatMul", ins, attrs, folded=True)
        return
    if s.stacked(a) and s.stacked(w) and s.rank(w) == 2 and s.rank(a) >= 3 and _branch_rows_product(s, node, a, w):
        return
    if min(s.rank(a), s.rank(w)) < 2:
        raise Unstackable("MatMul with a vector operand")
    s.leading_elementwise(node, ins, attrs)


def _branch_rows_product(s: BranchedTensors, node, a, w) -> bool:
    """A [2m, .., M, K] @ W [2m, K, N] as [2m, P·M, K] @ [2m, K, N]: one GEMM per branch over all of its
    rows. Broadcast over A's middle axes instead, onnxruntime runs 2m·P GEMMs of M rows (ViT's MLP: M = 36
    tokens, twice the time of the floor's 2m calls). False where the shapes are not known."""
    out, k = node.outputs[0], s.shapes[w.name][0]
    if out.shape is None or not isinstance(k, int) or sum(not isinstance(d, int) for d in out.shape) > 1:
        return False
    b = s.b
    rows = b.op("Reshape", [a, np.array([s.n, -1, k], np.int64)], dtype=a.dtype)
    y = b.op("MatMul", [rows, s.lead(w)], dtype=out.dtype)
    y = b.op("Reshape", [y, np.array([s.n] + [d if isinstance(d, int) else -1 for d in out.shape], np.int64)],
             dtype=out.dtype, hint=f"{node.name}.stacked")
    s.mapping[out.name] = s.register(y, out.shape, folded=False)
    return True


def gemm(s: BranchedTensors, node, ins, attrs):
    a, w = ins[0], ins[1]
    c = optional(ins, 2)
    if not s.stacked(a) and w.name in s.dequantized and wide_product(s, node, ins, attrs):
        return
    if s.stacked(a) and not attrs.get("transA", 0) and not s.stacked(w) and \
            (c is None or not s.stacked(c) and s.below_batch(c, 2)):
        s.emit(node, "Gemm", [s.fold(a)] + ins[1:], attrs, folded=True)
        return
    _leading_gemm(s, node, a, w, c, attrs)


def _leading_gemm(s: BranchedTensors, node, a, w, c, attrs):
    """Gemm as α·(A' @ B') + β·C on the leading form, A' and B' transposed as the attributes say."""
    b, dtype = s.b, node.outputs[0].dtype
    branched_a = s.stacked(a)
    a = s.lead(a) if branched_a else a
    if attrs.get("transA", 0):
        a = b.op("Transpose", [a], {"perm": [0, 2, 1] if branched_a else [1, 0]}, dtype=a.dtype)
        if branched_a:
            s.ranks[a.name] = 2
    if attrs.get("transB", 0):
        w = _transposed_weight(s, s.lead(w) if s.stacked(w) else w)
    elif s.stacked(w):
        w = s.lead(w)
    y = b.op("MatMul", [a, w], dtype=dtype)
    s.ranks[y.name] = 2
    if attrs.get("alpha", 1.0) != 1.0:
        y = b.op("Mul", [y, np.array(attrs["alpha"], np.float32)], dtype=dtype)
        s.ranks[y.name] = 2
    if c is None:
        s.mapping[node.outputs[0].name] = s.register(y, node.outputs[0].shape, folded=False)
        return
    c = s.padded(s.times_beta(s.lead(c) if s.stacked(c) else c, attrs.get("beta", 1.0), dtype), 2)
    s.emit(node, "Add", [y, c], {}, folded=False)


RULES = {op: elementwise for op in (
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Erf", "Exp",
    "Log", "Sqrt", "Neg", "Abs", "Clip", "Cast", "Identity", "Gelu", "HardSigmoid", "HardSwish", "Mish", "Softplus",
    "Elu", "Selu", "PRelu", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Equal", "Less", "Greater", "Not", "And",
    "Or", "QuantizeLinear")} | {op: batchwise for op in (
    "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Flatten", "Resize",
    "SpaceToDepth", "DepthToSpace", "BatchNormalization", "InstanceNormalization", "LRN")} | {op: axis_op for op in (
    "Softmax", "LogSoftmax", "LayerNormalization", "Hardmax", "Concat", "Gather")} | {op: reduce for op in (
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2")} | {
    "DequantizeLinear": dequantize, "Conv": conv, "Reshape": reshape, "Transpose": transpose, "Squeeze": squeeze,
    "Unsqueeze": squeeze, "MatMul": matmul, "Gemm": gemm, "Expand": expand}


def _trained_conv(s: BranchedTensors, node, ins):
    """The 2m perturbed kernels as 2m Convs, one per branch, on that branch's rows of the folded batch
    (or on the shared unbranched input), concatenated on the batch axis: the folded form without a copy.
    Each Conv keeps the QDQ pattern (DQ weight per channel, and the per-tensor QuantizeLinear after it)
    that onnxruntime fuses into QLinearConv. One wide or grouped Conv over all kernels was measured
    slower on onnxruntime: a grouped depthwise QLinearConv (group 2m·C) took 3.2x the time of the same
    work on the folded batch, and the wide output needs a transposing copy."""
    if ins[1].name not in s.dequantized:
        raise Unstackable("a stacked Conv weight that is not a perturbed weight")
    q, scale, zp, axis = s.dequantized[ins[1].name]
    if axis not in (None, 0):
        raise Unstackable("Conv weight quantized on an axis other than 0")
    bias = optional(ins, 2)
    if bias is not None and s.stacked(bias) and bias.name not in s.dequantized:
        raise Unstackable("a stacked Conv bias that is not a perturbed bias")
    b, n, out = s.b, s.n, node.outputs[0]
    if out.shape is None:
        raise Unstackable("Conv output of unknown shape")
    x = ins[0]
    rows = _branch_rows(s, s.fold(x)) if s.stacked(x) else None
    consumers = [c for c in out.outputs if id(c) in s.needed]
    requant = consumers[0] if len(consumers) == 1 and consumers[0].op == "QuantizeLinear" and all(
        isinstance(t, gs.Constant) and t.values.size == 1 for t in consumers[0].inputs[1:]) else None

    def kernel(k, q_, scale_, zp_, lo=None, hi=None):
        """Branch k's dequantized kernel (output channels lo:hi of it when given)."""
        if q_.name in s.parts:      # built from its inputs: no whole [2m, *shape] kernel, no copy out of it
            qk = s.parts[q_.name](b, k, lo, hi)
        else:
            qk = b.op("Squeeze", [q_, np.array([0], np.int64)], dtype=q_.dtype) if n == 1 else \
                b.op("Gather", [q_, np.array(k, np.int64)], {"axis": 0}, dtype=q_.dtype)
            if lo is not None:
                qk = _channels(b, qk, lo, hi)
        if lo is not None:
            scale_, zp_ = (_channels(b, t, lo, hi) for t in (scale_, zp_))
        return b.op("DequantizeLinear", [qk, scale_] + ([zp_] if zp_ is not None else []),
                    {"axis": 0} if per_axis(scale_) else {}, dtype=np.float32)

    def branch(k, xk, lo=None, hi=None):
        inputs = [xk, kernel(k, q, scale, zp, lo, hi)]
        if bias is not None:
            inputs.append(kernel(k, *s.dequantized[bias.name][:3], lo, hi) if bias.name in s.dequantized else
                          bias if lo is None else _channels(b, bias, lo, hi))
        y = b.op("Conv", inputs, dict(node.attrs), dtype=out.dtype, hint=f"{node.name}.branch{k}")
        if requant is not None:   # right after the Conv: QLinearConv
            y = b.op("QuantizeLinear", [y] + requant.inputs[1:], dict(requant.attrs), dtype=requant.outputs[0].dtype)
        return y

    pieces = _output_pieces(s, node, q)
    branch_outs = []
    for k in range(n):
        xk = x if rows is None else rows[k]
        if pieces == 1:
            branch_outs.append(branch(k, xk))
            continue
        size = q.shape[1] // pieces
        parts = [branch(k, xk, j * size, (j + 1) * size) for j in range(pieces)]
        branch_outs.append(b.op("Concat", parts, {"axis": 1}, dtype=parts[0].dtype, hint=f"{node.name}.pieces"))
    if requant is not None:
        out = requant.outputs[0]
    y = branch_outs[0] if n == 1 else b.op("Concat", branch_outs, {"axis": 0}, dtype=out.dtype,
                                              hint=f"{node.name}.stacked")
    s.mapping[out.name] = s.register(y, out.shape if out.shape is not None else node.outputs[0].shape, folded=True)


PIECE = 1 << 19     # float kernel elements dequantized at a time by the loop form's trained Conv (2 MiB)


def _output_pieces(s: BranchedTensors, node, q) -> int:
    """How many output-channel pieces a trained Conv runs in: 1, except in the loop form (one branch)
    for an ungrouped kernel of more than PIECE elements, where the float kernel (4 bytes per weight, the
    largest tensor a branch holds) is dequantized and used PIECE elements or fewer at a time. Each output
    channel is the same dot products either way."""
    shape = q.shape[1:] if q.shape is not None else None
    if s.n != 1 or node.attrs.get("group", 1) != 1 or not shape or any(not isinstance(d, int) for d in shape):
        return 1
    numel = int(np.prod(shape))
    return next(p for p in range(1, shape[0] + 1) if shape[0] % p == 0 and (numel // p <= PIECE or p == shape[0]))


def _channels(b: Builder, t, lo: int, hi: int):
    """Output channels lo:hi of a per-channel parameter (a constant, or a tensor sliced in-graph); a
    per-tensor one (or None) as it is."""
    if t is None or (isinstance(t, gs.Constant) and t.values.size == 1):
        return t
    if isinstance(t, gs.Constant):
        return b.const(t.values[lo:hi], "channels")
    return b.rows(t, lo, hi)


def _branch_rows(s: BranchedTensors, t):
    """The 2m branch parts of a folded tensor; split as integers when a per-tensor DQ makes it."""
    if s.n == 1:       # one branch (the loop form): the tensor is its only part
        return [t]
    p = per_tensor_dq(t)
    if p is not None:
        parts = s.b.op("Split", [p.inputs[0]], {"axis": 0, "num_outputs": s.n}, dtype=p.inputs[0].dtype, outputs=s.n)
        return [s.b.op("DequantizeLinear", [part] + p.inputs[1:], dict(p.attrs), dtype=t.dtype) for part in parts]
    return s.b.op("Split", [t], {"axis": 0, "num_outputs": s.n}, dtype=t.dtype, outputs=s.n)


def _dequantized(b: Builder, q, scale, zero_point, axis, rank_: int, dtype):
    """(float(q) − zp) · scale for a stacked integer weight [2m, *shape], as Cast/Sub/Mul.

    Not DequantizeLinear: onnxruntime fuses DQ → MatMul into MatMulIntegerToFloat, whose per-channel
    zero point check rejects a stacked [2m, K, N] B at run time. The arithmetic is the same as DQ's
    (the integer difference is exact in float32, then one multiply)."""
    def on_axis(t):
        if axis is None or t.values.ndim == 0:
            return t.values
        a = axis if axis >= 0 else axis + rank_
        return t.values.reshape([-1] + [1] * (rank_ - 1 - a))
    if not isinstance(scale, gs.Constant) or (zero_point is not None and not isinstance(zero_point, gs.Constant)):
        raise Unstackable("quantization parameters computed in-graph")
    x = b.op("Cast", [q], {"to": 1}, dtype=np.float32)
    if zero_point is not None and np.any(zero_point.values != 0):
        x = b.op("Sub", [x, on_axis(zero_point).astype(np.float32)], dtype=np.float32)
    return b.op("Mul", [x, on_axis(scale).astype(np.float32)], dtype=dtype)


def _transposed_weight(s: BranchedTensors, w: gs.Tensor) -> gs.Tensor:
    """W^T for MatMul. A stacked weight is transposed as integers, before its dequantization: half the
    bytes, and no float Transpose after a DQ for onnxruntime's QDQ optimizer to wrap in a Q/DQ pair."""
    b = s.b
    if not s.stacked(w):
        return b.op("Transpose", [w], {"perm": [1, 0]}, dtype=w.dtype)
    if w.name in s.dequantized:
        q, scale, zp, axis = s.dequantized[w.name]
        qt = b.op("Transpose", [q], {"perm": [0, 2, 1]}, dtype=q.dtype)
        if axis is not None:
            axis = {0: 1, 1: 0, -1: -2, -2: -1}[axis]
        out = _dequantized(b, qt, scale, zp, axis, 2, w.dtype)
    else:
        out = b.op("Transpose", [w], {"perm": [0, 2, 1]}, dtype=w.dtype)
    s.ranks[out.name] = 2
    return out
