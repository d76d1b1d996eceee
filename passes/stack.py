"""stack: run the trained suffix once for all 2m branches, with the branches folded into the batch.

Cloning the suffix per branch (pair's fallback) costs 2m copies of every node; onnxruntime pays a fixed
dispatch cost per node, and on small layers that cost is most of a training step. Stacking keeps one
node per original node. A tensor that depends on the perturbed weights takes one of two forms:

    folded   [2m·B, ...]   branch-major in the batch axis: batch-wise ops (Conv, pooling, Gemm, MatMul on
                           frozen weights, Q/DQ) run unchanged, once, on 2m·B rows, and keep the QDQ
                           patterns onnxruntime fuses to int8 kernels
    leading  [2m, B, ...]  a new leading axis that numpy broadcasting carries (a per-branch weight or bias,
                           an unstacked operand of another batch size)
Converting between them is a Reshape (of the integer input when a per-tensor DequantizeLinear makes the
tensor, so the DQ stays next to its consumer). Per-op rules, in RULES:

    elementwise, Q/DQ      folded when every other operand broadcasts below the batch axis; else leading,
                           with stacked inputs of lower rank padded after the branch axis
    batch-wise             (Conv on frozen weights, pooling, Flatten, Resize, ...) folded
    Reshape, Transpose,    folded when the batch axis stays the leading one; else leading (Reshape
    Concat, Squeeze, ...   prepends 2m, axes move by one)
    Softmax, LayerNorm,    folded when they do not reduce over the batch axis; else leading
    reductions
    MatMul / Gemm          frozen B: folded; a perturbed B: one wide product A·[W⁺₀ … W⁻ₘ₋₁]; two
                           stacked operands: a batched MatMul on the leading axis
    Conv, perturbed W      one Conv per branch kernel on that branch's rows of the folded batch (or on
                           the shared unstacked input), concatenated on the batch axis
Any other op raises Unstackable with the reason, and pair clones instead (and records why).

Precondition: `nodes` in graph order; `stacked` maps the names of the perturbed tensors to their
[2m, *shape] replacements; tensor shapes are known (the pipeline runs shape inference first).
Postcondition: new nodes appended to the graph computing, for every suffix tensor, its stack; the
returned mapping gives the loss tap in the leading form [2m, B, ...]; the original nodes are untouched.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .graph_ops import Builder

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Relu", "LeakyRelu", "Sigmoid",
               "Tanh", "Erf", "Exp", "Log", "Sqrt", "Neg", "Abs", "Clip", "Cast", "Identity", "Gelu",
               "HardSigmoid", "HardSwish", "Mish", "Softplus", "Elu", "Selu", "PRelu", "Reciprocal", "Floor",
               "Ceil", "Round", "Sign", "Equal", "Less", "Greater", "Not", "And", "Or",
               "QuantizeLinear", "DequantizeLinear"}
BATCHWISE = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
             "Flatten", "Resize", "SpaceToDepth", "DepthToSpace", "BatchNormalization",
             "InstanceNormalization", "LRN"}
LAST_AXIS_OPS = {"Softmax", "LogSoftmax", "LayerNormalization", "Hardmax"}
REDUCE_OPS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2"}


class Unstackable(Exception):
    pass


def _rank(t: gs.Tensor) -> int:
    if isinstance(t, gs.Constant):
        return t.values.ndim
    if t.shape is None:
        raise Unstackable(f"unknown rank of {t.name}")
    return len(t.shape)


def stack_suffix(graph: gs.Graph, nodes: list[gs.Node], stacked: dict[str, gs.Tensor], branches: int,
                 tap: str):
    """Returns ({original tensor name: stacked tensor}, None) with mapping[tap] in the leading form, or
    (None, reason) when some node cannot be stacked."""
    s = Stacker(graph, stacked, branches, {id(n) for n in nodes})
    mark = len(graph.nodes)
    try:
        for node in nodes:
            if node.outputs[0].name in s.mapping:     # made already (a Conv emitted its QuantizeLinear)
                continue
            if len(node.outputs) != 1:
                raise Unstackable(f"{len(node.outputs)} outputs")
            s.run(node)
        s.mapping[tap] = s.lead(s.mapping[tap])
    except Unstackable as exc:
        del graph.nodes[mark:]
        return None, f"node {node.name!r} ({node.op}): {exc}" if "node" in locals() else str(exc)
    return s.mapping, None


class Stacker:
    def __init__(self, graph, stacked: dict, branches: int, needed: set):
        self.b, self.n, self.needed = Builder(graph, "stack"), branches, needed
        self.mapping = dict(stacked)
        self.ranks = {t.name: _rank(t) - 1 for t in stacked.values()}   # stacked name -> unstacked rank
        self.shapes = {t.name: list(t.shape[1:]) for t in stacked.values()}
        self.folded: set[str] = set()
        self.views: dict = {}        # (name, folded?) -> converted tensor
        self.perturbed = {t.name for t in stacked.values()}
        self.weights = {}   # float output of a perturbed weight's dequantization -> (q, scale, zero point, axis)

    # -- forms
    def stacked(self, t) -> bool:
        return t is not None and t.name in self.ranks

    def rank(self, t) -> int:
        return self.ranks[t.name] if t.name in self.ranks else _rank(t)

    def register(self, y, orig_shape, folded: bool):
        self.ranks[y.name] = len(orig_shape)
        self.shapes[y.name] = list(orig_shape)
        y.shape = list(orig_shape) if folded else [self.n] + list(orig_shape)
        if folded:
            y.shape[0] = self.n * y.shape[0] if isinstance(y.shape[0], int) else None
            self.folded.add(y.name)
        return y

    def _static_tail(self, t) -> list[int]:
        tail = self.shapes[t.name][1:]
        if not all(isinstance(d, int) for d in tail):
            raise Unstackable(f"{t.name} has non-static dims {tail}")
        return tail

    def lead(self, t):
        """[2m, B, ...] view of a stacked tensor."""
        if t.name not in self.folded:
            return t
        return self._view(t, [self.n, -1] + self._static_tail(t), folded=False)

    def fold(self, t):
        """[2m·B, ...] view of a stacked tensor."""
        if t.name in self.folded:
            return t
        if self.ranks[t.name] == 0:
            raise Unstackable("a scalar has no batch axis to fold into")
        return self._view(t, [-1] + self._static_tail(t), folded=True)

    def _view(self, t, shape, folded):
        key = (t.name, folded)
        if key not in self.views:
            self.views[key] = self.register(self.on_integers(t, lambda x: self.b.op(
                "Reshape", [x, np.array(shape, np.int64)], dtype=x.dtype)), self.shapes[t.name], folded)
        return self.views[key]

    def on_integers(self, t, layout):
        """layout(t), applied before a per-tensor DequantizeLinear when one makes t: it moves a quarter of
        the bytes, and the DQ stays next to its consumer, the QDQ pattern onnxruntime fuses."""
        p = t.inputs[0] if t.inputs else None
        if p is not None and p.op == "DequantizeLinear" and all(
                isinstance(q, gs.Constant) and q.values.size == 1 for q in p.inputs[1:]):
            return self.b.op("DequantizeLinear", [layout(p.inputs[0])] + p.inputs[1:], dict(p.attrs), dtype=t.dtype)
        return layout(t)

    def emit(self, node, op_type, inputs, attrs, folded: bool, out_shape=None):
        out = node.outputs[0]
        y = self.b.op(op_type, inputs, attrs, dtype=out.dtype, hint=f"{node.name}.stacked")
        shape = out_shape if out_shape is not None else out.shape
        if shape is None:
            raise Unstackable(f"unknown shape of {out.name}")
        self.mapping[out.name] = self.register(y, shape, folded)
        return y

    def below_batch(self, t, out_rank: int) -> bool:
        """An unstacked operand that broadcasts without touching the batch axis (rank below the output's,
        or a size-1 batch axis)."""
        if isinstance(t, gs.Constant):
            shape = t.values.shape
        elif t.shape is None:
            return False
        else:
            shape = t.shape
        return len(shape) < out_rank or shape[0] == 1

    def run(self, node):
        ins = [self.mapping.get(t.name, t) if t is not None and t.name else None for t in node.inputs]
        if node.op == "DequantizeLinear" and ins[0].name in self.perturbed:
            return _perturbed_weight(self, node, ins)
        if node.op == "Conv" and self.stacked(ins[1]):
            return _trained_conv(self, node, ins)
        rule = RULES.get(node.op)
        if rule is None:
            raise Unstackable("no branch-axis rule for this op")
        rule(self, node, ins, dict(node.attrs))


def _normal_axes(axes, rank):
    return [a + rank if a < 0 else a for a in axes]


def _leading_elementwise(s: Stacker, node, ins, attrs):
    rank = max(s.rank(t) for t in ins if t is not None)
    ins = [s.lead(t) if s.stacked(t) else t for t in ins]
    if node.op in ("QuantizeLinear", "DequantizeLinear") and _per_axis(ins[1]):
        axis = attrs.get("axis", 1)
        if axis >= 0:
            attrs["axis"] = axis + 1
    aligned = []
    for t in ins:
        if s.stacked(t) and s.ranks[t.name] < rank:
            t = s.b.op("Unsqueeze", [t, np.arange(1, 1 + rank - s.ranks[t.name], dtype=np.int64)], dtype=t.dtype)
        aligned.append(t)
    s.emit(node, node.op, aligned, attrs, folded=False)


def elementwise(s: Stacker, node, ins, attrs):
    if node.op in ("QuantizeLinear", "DequantizeLinear") and (
            any(s.stacked(t) for t in ins[1:]) or attrs.get("block_size", 0)):
        raise Unstackable("stacked or blocked quantization parameters")
    out_rank = max(s.rank(t) for t in ins if t is not None)
    foldable = all((s.stacked(t) and t.name in s.folded and s.ranks[t.name] == out_rank) if s.stacked(t)
                   else s.below_batch(t, out_rank) for t in ins if t is not None) and out_rank > 0
    if foldable:
        s.emit(node, node.op, ins, attrs, folded=True)
    else:
        _leading_elementwise(s, node, ins, attrs)


def only_first_stacked(s: Stacker, ins, op):
    if not s.stacked(ins[0]) or any(s.stacked(t) for t in ins[1:]):
        raise Unstackable(f"{op} with a stacked parameter")


def batchwise(s: Stacker, node, ins, attrs):
    only_first_stacked(s, ins, node.op)
    if node.op == "Flatten" and attrs.get("axis", 1) == 0:
        raise Unstackable("Flatten(axis=0) merges the batch axis")
    if node.op == "Resize" and len(ins) > 3 and ins[3] is not None:
        raise Unstackable("Resize by sizes (batch size included)")
    s.emit(node, node.op, [s.fold(ins[0])] + ins[1:], attrs, folded=True)


def reshape(s: Stacker, node, ins, attrs):
    only_first_stacked(s, ins, "Reshape")
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


def transpose(s: Stacker, node, ins, attrs):
    only_first_stacked(s, ins, "Transpose")
    perm = attrs.get("perm", list(range(s.rank(ins[0])))[::-1])
    if perm[0] == 0:
        s.emit(node, "Transpose", [s.fold(ins[0])], {"perm": perm}, folded=True)
    else:
        s.emit(node, "Transpose", [s.lead(ins[0])], {"perm": [0] + [p + 1 for p in perm]}, folded=False)


def axis_op(s: Stacker, node, ins, attrs):
    """Ops with one `axis` attribute: Softmax, LayerNormalization, Concat, Gather."""
    op = node.op
    if op == "Concat":
        whole = all(s.stacked(t) for t in ins)
    else:
        only_first_stacked(s, ins, op)
        whole = True
    axis = attrs.get("axis", 0 if op in ("Concat", "Gather") else -1)
    rank = s.rank(ins[0])
    axis = axis + rank if axis < 0 else axis
    if whole and axis >= 1:
        s.emit(node, op, [s.fold(t) if s.stacked(t) else t for t in ins], attrs, folded=True)
        return
    attrs["axis"] = axis + 1
    if op == "Concat":     # an unstacked operand is repeated for every branch
        ins = [s.lead(t) if s.stacked(t) else s.b.op("Expand", [
            s.b.op("Unsqueeze", [t, np.array([0], np.int64)], dtype=t.dtype),
            np.array([s.n] + [1] * _rank(t), np.int64)], dtype=t.dtype) for t in ins]
    else:
        ins = [s.lead(ins[0])] + ins[1:]
    s.emit(node, op, ins, attrs, folded=False)


def reduce(s: Stacker, node, ins, attrs):
    if len(ins) < 2 or not isinstance(ins[1], gs.Constant) or ins[1].values.size == 0:
        raise Unstackable("reduction without constant axes")
    only_first_stacked(s, ins, node.op)
    axes = _normal_axes([int(a) for a in ins[1].values], s.rank(ins[0]))
    if 0 not in axes:
        s.emit(node, node.op, [s.fold(ins[0])] + ins[1:], attrs, folded=True)
    else:
        s.emit(node, node.op, [s.lead(ins[0]), np.array([a + 1 for a in axes], np.int64)] + ins[2:], attrs,
               folded=False)


def squeeze(s: Stacker, node, ins, attrs):
    only_first_stacked(s, ins, node.op)
    if len(ins) < 2 or not isinstance(ins[1], gs.Constant):
        raise Unstackable(f"{node.op} without constant axes")
    out_rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
    if out_rank is None:
        raise Unstackable("unknown rank")
    rank = s.rank(ins[0]) if node.op == "Squeeze" else out_rank
    axes = _normal_axes([int(a) for a in ins[1].values], rank)
    if 0 not in axes:
        s.emit(node, node.op, [s.fold(ins[0]), np.array(axes, np.int64)], attrs, folded=True)
    else:
        s.emit(node, node.op, [s.lead(ins[0]), np.array([a + 1 for a in axes], np.int64)], attrs, folded=False)


def matmul(s: Stacker, node, ins, attrs):
    a, w = ins[0], ins[1]
    if not s.stacked(a) and w.name in s.weights and _wide(s, node, ins, attrs):
        return
    if s.stacked(a) and a.name in s.folded and not s.stacked(w) and _rank(w) <= 2 or \
            s.stacked(a) and s.stacked(w) and a.name in s.folded and w.name in s.folded and s.rank(a) >= 3 \
            and s.rank(a) == s.rank(w):
        s.emit(node, "MatMul", ins, attrs, folded=True)
        return
    ra, rb = s.rank(a), s.rank(w)
    if min(ra, rb) < 2:
        raise Unstackable("MatMul with a vector operand")
    _leading_elementwise(s, node, ins, attrs)


def gemm(s: Stacker, node, ins, attrs):
    a, w = ins[0], ins[1]
    c = ins[2] if len(ins) > 2 and ins[2] is not None else None
    if not s.stacked(a) and w.name in s.weights and _wide(s, node, ins, attrs):
        return
    if s.stacked(a) and not attrs.get("transA", 0) and not s.stacked(w) and \
            (c is None or not s.stacked(c) and s.below_batch(c, 2)):
        s.emit(node, "Gemm", [s.fold(a)] + ins[1:], attrs, folded=True)
        return
    b = s.b
    a = s.lead(a) if s.stacked(a) else a
    if attrs.get("transA", 0):
        a = b.op("Transpose", [a], {"perm": [0, 2, 1] if s.stacked(a) else [1, 0]}, dtype=a.dtype)
        if s.stacked(ins[0]):
            s.ranks[a.name] = 2
    if attrs.get("transB", 0):
        w = _transposed_weight(b, s.lead(w) if s.stacked(w) else w, s.stacked(w), s.ranks, s.weights)
    elif s.stacked(w):
        w = s.lead(w)
    y = b.op("MatMul", [a, w], dtype=node.outputs[0].dtype)
    s.ranks[y.name] = 2
    if attrs.get("alpha", 1.0) != 1.0:
        y = b.op("Mul", [y, np.array(attrs["alpha"], np.float32)], dtype=node.outputs[0].dtype)
        s.ranks[y.name] = 2
    if c is None:
        s.mapping[node.outputs[0].name] = s.register(y, node.outputs[0].shape, folded=False)
        return
    c = _times_beta(b, s.lead(c) if s.stacked(c) else c, attrs.get("beta", 1.0), s.ranks, node.outputs[0].dtype)
    if s.stacked(c):
        if s.ranks[c.name] < 2:
            c = b.op("Unsqueeze", [c, np.array([1], np.int64)], dtype=c.dtype)
    s.emit(node, "Add", [y, c], {}, folded=False)


RULES = {op: elementwise for op in ELEMENTWISE} | {op: batchwise for op in BATCHWISE} | \
    {op: axis_op for op in LAST_AXIS_OPS | {"Concat", "Gather"}} | {op: reduce for op in REDUCE_OPS} | \
    {"Reshape": reshape, "Transpose": transpose, "Squeeze": squeeze, "Unsqueeze": squeeze, "MatMul": matmul,
     "Gemm": gemm}


def _perturbed_weight(s: Stacker, node, ins):
    """DQ of a perturbed [2m, *shape] weight: (float(q) − zp)·scale, kept lazy for the wide products."""
    if any(s.stacked(t) for t in ins[1:]) or node.attrs.get("block_size", 0):
        raise Unstackable("stacked or blocked quantization parameters")
    axis = node.attrs.get("axis", 1) if _per_axis(ins[1]) else None
    zp = ins[2] if len(ins) > 2 else None
    y = _dequantized(s.b, ins[0], ins[1], zp, axis, s.rank(ins[0]), node.outputs[0].dtype)
    s.weights[y.name] = (ins[0], ins[1], zp, axis)
    s.register(y, s.shapes[ins[0].name], folded=False)
    s.mapping[node.outputs[0].name] = y


def _trained_conv(s: Stacker, node, ins):
    """The 2m perturbed kernels as 2m Convs, one per branch, on that branch's rows of the folded batch
    (or on the shared unstacked input), concatenated on the batch axis: the folded form without a copy.
    Each Conv keeps the QDQ pattern (DQ weight per channel, and the per-tensor QuantizeLinear after it)
    that onnxruntime fuses into QLinearConv. One wide or grouped Conv over all kernels was measured
    slower on onnxruntime: a grouped depthwise QLinearConv (group 2m·C) took 3.2x the time of the same
    work on the folded batch, and the wide output needs a transposing copy."""
    if ins[1].name not in s.weights:
        raise Unstackable("a stacked Conv weight that is not a perturbed weight")
    q, scale, zp, axis = s.weights[ins[1].name]
    if axis not in (None, 0):
        raise Unstackable("Conv weight quantized on an axis other than 0")
    bias = ins[2] if len(ins) > 2 and ins[2] is not None else None
    if bias is not None and s.stacked(bias) and bias.name not in s.weights:
        raise Unstackable("a stacked Conv bias that is not a perturbed bias")
    b, n, out = s.b, s.n, node.outputs[0]
    if out.shape is None:
        raise Unstackable("Conv output of unknown shape")
    x = ins[0]
    rows = _branch_rows(s, s.fold(x)) if s.stacked(x) else None
    consumers = [c for c in out.outputs if id(c) in s.needed]
    requant = consumers[0] if len(consumers) == 1 and consumers[0].op == "QuantizeLinear" and all(
        isinstance(t, gs.Constant) and t.values.size == 1 for t in consumers[0].inputs[1:]) else None

    def kernel(k, q_, scale_, zp_):
        qk = b.op("Gather", [q_, np.array(k, np.int64)], {"axis": 0}, dtype=q_.dtype)
        return b.op("DequantizeLinear", [qk, scale_] + ([zp_] if zp_ is not None else []),
                    {"axis": 0} if _per_axis(scale_) else {}, dtype=np.float32)

    branch_outs = []
    for k in range(n):
        xk = x if rows is None else rows[k]
        inputs = [xk, kernel(k, q, scale, zp)]
        if bias is not None:
            inputs.append(kernel(k, *s.weights[bias.name][:3]) if bias.name in s.weights else bias)
        y = b.op("Conv", inputs, dict(node.attrs), dtype=out.dtype, hint=f"{node.name}.branch{k}")
        if requant is not None:   # right after the Conv: QLinearConv
            y = b.op("QuantizeLinear", [y] + requant.inputs[1:], dict(requant.attrs), dtype=requant.outputs[0].dtype)
        branch_outs.append(y)
    if requant is not None:
        out = requant.outputs[0]
    y = b.op("Concat", branch_outs, {"axis": 0}, dtype=out.dtype, hint=f"{node.name}.stacked")
    s.mapping[out.name] = s.register(y, out.shape if out.shape is not None else node.outputs[0].shape, folded=True)


def _branch_rows(s: Stacker, t):
    """The 2m branch parts of a folded tensor; split as integers when a per-tensor DQ makes it."""
    p = t.inputs[0] if t.inputs else None
    if p is not None and p.op == "DequantizeLinear" and all(
            isinstance(q, gs.Constant) and q.values.size == 1 for q in p.inputs[1:]):
        parts = s.b.op("Split", [p.inputs[0]], {"axis": 0, "num_outputs": s.n}, dtype=p.inputs[0].dtype, outputs=s.n)
        return [s.b.op("DequantizeLinear", [part] + p.inputs[1:], dict(p.attrs), dtype=t.dtype) for part in parts]
    return s.b.op("Split", [t], {"axis": 0, "num_outputs": s.n}, dtype=t.dtype, outputs=s.n)


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


def _wide(s: Stacker, node: gs.Node, ins, attrs) -> bool:
    """A · W± as one wide product: the 2m weight copies side by side on the output-feature axis,
    A [.., M, K] @ W [K, 2m·N] -> [.., M, 2m·N] -> [2m, .., M, N]. One large GEMM instead of 2m small
    ones, and the perturbed weights keep a plain 2-D DequantizeLinear (per-channel scales tiled), the
    form onnxruntime's QDQ fusion (QGemm, MatMulIntegerToFloat) already handles.
    Returns False (nothing emitted) where the shapes are not known."""
    b, weights, ranks, branches = s.b, s.weights, s.ranks, s.n
    q, scale, zp, axis = weights[ins[1].name]
    out = node.outputs[0]
    if out.shape is None or q.shape is None or len(q.shape) != 3 or not all(isinstance(d, int) for d in q.shape[1:]):
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
        c = _times_beta(b, s.lead(c) if s.stacked(c) else c, attrs.get("beta", 1.0), ranks, out.dtype)
        if c.name in ranks and ranks[c.name] < ra:
            c = b.op("Unsqueeze", [c, np.arange(1, 1 + ra - ranks[c.name], dtype=np.int64)], dtype=c.dtype)
        y = b.op("Add", [y, c], dtype=out.dtype)
        ranks[y.name] = ra
    s.mapping[out.name] = s.register(y, out.shape, folded=False)
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
