"""Graph building and walking shared by every pass: a Builder of named ops, dtype-fixed views, the walks.

All helpers build onnx-graphsurgeon nodes in place on a gs.Graph. Names are deterministic (prefix + hint
+ counter) so that two compilations of the same model with the same spec produce identical files.

    b = Builder(graph, "update")
    r = b.i32.Mul(b.i32.Sign(t), mag, hint="r")        # int32 ops; 3 becomes an int32 constant
    b.op("Cast", [x], {"to": ...}, name="w__next")      # an output with a given (graph I/O) name
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper


# |w| up to which onnxruntime's uint8 × int8 kernels cannot saturate: two products 255·64 sum below 2^15
U8S8_SAFE = 64


def onnx_dtype(np_dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(np_dtype))


class Builder:
    """Adds nodes to `graph` with unique names under `prefix`."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph, self.prefix, self.count = graph, prefix, 0
        self.i32, self.f32 = Typed(self, np.int32), Typed(self, np.float32)

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}/{hint}_{self.count}"

    def const(self, array, hint: str = "const") -> gs.Constant:
        return gs.Constant(self.name(hint), np.asarray(array))

    def op(self, op_type: str, inputs, attrs=None, dtype=None, shape=None, hint=None, outputs=1, name=None):
        """One node; numpy inputs become constants. Returns its output Variable (or a list); `name` names
        the (single) output, else it is `<node name>:0`."""
        ins = [x if isinstance(x, gs.Tensor) else self.const(x) for x in inputs]
        node = self.name(hint or op_type.lower())
        outs = [gs.Variable(name if name and outputs == 1 else f"{node}:{k}", dtype=dtype, shape=shape)
                for k in range(outputs)]
        self.graph.nodes.append(gs.Node(op_type, node, attrs or {}, ins, outs))
        return outs[0] if outputs == 1 else outs

    def cast(self, x, np_dtype, hint="cast", name=None, shape=None):
        return self.op("Cast", [x], {"to": onnx_dtype(np_dtype)}, dtype=np.dtype(np_dtype), hint=hint, name=name,
                       shape=shape)

    def view(self, x, shape, hint="view", name=None, dtype=None):
        """x reshaped to `shape` (a free view in onnxruntime)."""
        return self.op("Reshape", [x, np.array(shape, np.int64)], dtype=dtype or x.dtype, hint=hint, name=name,
                       shape=list(shape))

    def rows(self, x, lo, hi):
        """Rows lo:hi of x's leading axis (ints, or int64 [1] tensors computed in the graph)."""
        bound = lambda v: v if isinstance(v, gs.Tensor) else np.array([v], np.int64)
        return self.op("Slice", [x, bound(lo), bound(hi), np.array([0], np.int64)], dtype=x.dtype)

    def as_int32(self, x, hint="int32"):
        """x itself when int32, else its Cast (an int8/int16 ĝ of the loop form widened for arithmetic)."""
        return x if np.dtype(x.dtype) == np.int32 else self.cast(x, np.int32, hint=hint)

    def clip_int32(self, x, lo: int, hi: int, hint="clip"):
        """Saturate an int32 tensor to [lo, hi] (int16 has no Clip in onnxruntime; int32 does)."""
        return self.i32.Clip(x, lo, hi, hint=hint)

    def integer_product(self, op: str, a, w, a_zero=None, w_zero=None, attrs=None, hint="acc", bound=None):
        """int32 MatMulInteger/ConvInteger (`op`) of (a − a_zero)·(w − w_zero), exact on every CPU. onnxruntime's
        uint8 × int8 kernel on x86 without AVX-VNNI adds byte-product pairs in saturating int16 (VPMADDUBSW),
        wrong once |w| > 64 (a [4096, 576]·[576, 256] product was off by 149,238); its uint8 × uint8 kernel
        widens first. So an int8 w with values past U8S8_SAFE (`bound`, else a constant's own max |w|; unknown:
        assumed past) is read as uint8 w + 128 with zero point w_zero + 128: the same integers, in 1.3x the
        time there (benchmarks/integer_kernels.py). a_zero/w_zero: None, or an 8-bit constant (array or gs.Constant).
        bound: the largest |w| where the caller knows it (node's signal V: m)."""
        zero = lambda z, dtype: z if isinstance(z, gs.Tensor) else self.const(np.asarray(z).astype(dtype))
        signed = np.dtype(a.dtype) == np.uint8 and np.dtype(w.dtype) == np.int8
        if signed and bound is None and isinstance(w, gs.Constant):
            bound = int(np.abs(w.values.astype(np.int32)).max(initial=0))
        if signed and (bound is None or bound > U8S8_SAFE):
            shift = lambda v: (np.asarray(v).astype(np.int32) + 128).astype(np.uint8)
            w_zero = shift(0 if w_zero is None else (w_zero.values if isinstance(w_zero, gs.Constant) else w_zero))
            w = self.const(shift(w.values), "weight") if isinstance(w, gs.Constant) else \
                self.cast(self.i32.Add(self.as_int32(w), np.int32(128), hint="offset"), np.uint8, hint="unsigned")
        if a_zero is None and w_zero is not None:   # w's zero point is the fourth input
            a_zero = np.zeros((), np.dtype(a.dtype))
        inputs = [a, w] + ([zero(a_zero, a.dtype)] if a_zero is not None else []) + \
            ([zero(w_zero, w.dtype)] if w_zero is not None else [])
        return self.op(op, inputs, attrs, dtype=np.int32, hint=hint)


def grid_level(b: Builder, lo: int, hi: int, approx, below):
    """The largest integer y in [lo, hi] with below(y) (a bool tensor, monotone: true up to some level), else
    lo, as int32. `approx` (float) is ⌊that level⌋ up to a few ULPs: from y₀ = clip(⌊approx⌋),
    y = y₀ − 1 + [below(y₀)] + [below(y₀ + 1)], clipped to [lo, hi] (y₀ is off by at most one, and
    below(y₀ − 1) holds then). Two exact comparisons decide; the float guess (a division, which OpenVINO
    does not round as IEEE does) only saves the eight of a bisection."""
    lo, hi = np.int32(lo), np.int32(hi)
    y0 = b.i32.Clip(b.cast(b.f32.Floor(b.f32.Clip(approx, np.float32(lo), np.float32(hi), hint="guess_in_grid"),
                                       hint="guess"), np.int32), lo, hi, hint="guess")
    ones = [b.cast(below(y), np.int32, hint="below") for y in (y0, b.i32.Add(y0, np.int32(1), hint="next"))]
    y = b.i32.Add(b.i32.Add(b.i32.Sub(y0, np.int32(1), hint="previous"), ones[0], hint="level"), ones[1], hint="level")
    return b.i32.Clip(y, lo, hi, hint="level")


class Typed:
    """`b.i32.Add(x, 1)`: an op whose output has one dtype; Python numbers become constants of it
    (numpy arrays keep theirs, e.g. an int64 shape). Attributes go as keywords."""

    def __init__(self, b: Builder, dtype):
        self.b, self.dtype = b, np.dtype(dtype)

    def __getattr__(self, op_type: str):
        def make(*inputs, hint=None, name=None, shape=None, **attrs):
            ins = [np.array(x, self.dtype) if isinstance(x, (int, float)) else x for x in inputs]
            return self.b.op(op_type, ins, attrs, dtype=self.dtype, hint=hint, name=name, shape=shape)
        return make


def optional_input(node: gs.Node, k: int):
    """Input k, or None when absent (past the end, or the empty name of an omitted optional input)."""
    return node.inputs[k] if k < len(node.inputs) and node.inputs[k].name else None


def channels_last_rows(b: Builder, q, zero_point: gs.Constant, patches, image) -> gs.Tensor:
    """The im2col rows [B·H'·W', kh·kw·C] of q [B, C, H, W] (image (C, H, W), patches a formulas.Patches), column
    (i, j, c), padded with the zero point: q made channels-last once, so the Gather copies C contiguous values
    per tap (node._input_rows's (c, i, j) order gathers single values and transposes the result: 5-10x slower
    on onnxruntime for the same integers). rows_to_nchw takes a product of these rows back."""
    (c, h, w), (pt, pl, pb, pr) = image, patches.pads
    zero = np.asarray(zero_point.values).reshape(())
    nhwc = b.op("Transpose", [q], {"perm": [0, 2, 3, 1]}, dtype=q.dtype)
    if tuple(patches.kernel) == (1, 1) and tuple(patches.strides) == (1, 1) and not any(patches.pads):
        return b.op("Reshape", [nhwc, np.array([-1, c], np.int64)], dtype=q.dtype, hint="patches")   # a pointwise Conv
    padded = b.op("Pad", [nhwc, np.array([0, pt, pl, 0, 0, pb, pr, 0], np.int64), zero], {"mode": "constant"},
                  dtype=q.dtype)
    flat = b.op("Reshape", [padded, np.array([0, -1, c], np.int64)], dtype=q.dtype)              # [B, Hp·Wp, C]
    taken = b.op("Gather", [flat, patches.indices(h, w).T.copy()], {"axis": 1}, dtype=q.dtype)   # [B, P, k, C]
    return b.op("Reshape", [taken, np.array([-1, c * int(np.prod(patches.kernel))], np.int64)], dtype=q.dtype,
                hint="patches")


def rows_to_nchw(b: Builder, rows, out_size, out: gs.Variable | None = None) -> gs.Tensor:
    """A Conv's output rows [B·H'·W', O] (out_size = (H', W', O)) as [B, O, H', W'], written to `out` if given."""
    ho, wo, o = out_size
    nhwc = b.op("Reshape", [rows, np.array([-1, ho, wo, o], np.int64)], dtype=rows.dtype)
    if out is None:
        return b.op("Transpose", [nhwc], {"perm": [0, 3, 1, 2]}, dtype=rows.dtype, hint="nchw")
    b.graph.nodes.append(gs.Node("Transpose", b.name("nchw"), {"perm": [0, 3, 1, 2]}, [nhwc], [out]))
    return out


def graphs(graph: gs.Graph):
    """The graph and every Loop/If body in it."""
    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield from graphs(value)


def downstream_nodes(graph: gs.Graph, start: list[gs.Tensor]) -> list[gs.Node]:
    """Every node that depends on any tensor in `start`, in graph order."""
    seen, stack = set(), list(start)
    while stack:
        t = stack.pop()
        for node in t.outputs:
            if id(node) not in seen:
                seen.add(id(node))
                stack.extend(node.outputs)
    return [n for n in graph.nodes if id(n) in seen]


def upstream_nodes(nodes: list[gs.Node], tap: str) -> list[gs.Node]:
    """The nodes among `nodes` that the tensor named `tap` depends on, in their order."""
    by_output = {t.name: n for n in nodes for t in n.outputs}
    need, stack = set(), [tap]
    while stack:
        node = by_output.get(stack.pop())
        if node is not None and id(node) not in need:
            need.add(id(node))
            stack.extend(t.name for t in node.inputs if t is not None)
    return [n for n in nodes if id(n) in need]


def clone_nodes(graph: gs.Graph, nodes: list[gs.Node], replace: dict, suffix: str) -> dict:
    """Copy `nodes` into `graph`; inputs found in `replace` (by tensor name) are substituted and
    every produced tensor gets `suffix`. Returns the map original name -> cloned tensor."""
    mapping = dict(replace)
    for node in nodes:
        ins = [mapping.get(t.name, t) for t in node.inputs]
        outs = []
        for t in node.outputs:
            new = gs.Variable(t.name + suffix, dtype=t.dtype, shape=t.shape)
            mapping[t.name] = new
            outs.append(new)
        graph.nodes.append(gs.Node(node.op, node.name + suffix, dict(node.attrs), ins, outs,
                                   domain=node.domain))
    return mapping


WEIGHTED = {"Conv", "ConvTranspose", "MatMul", "Gemm", "ConvInteger", "MatMulInteger"}


def bypass_requant(nodes):
    """Read each activation Q→DQ pair after the suffix's last weighted op (Conv, MatMul, Gemm) as its
    float input. There, on a uint8 grid, most ±ε steps of a weight vanish in the rounding and the losses
    see a staircase (the transformer's classifier requantizes its MatMul output before the bias Add).
    Before a weighted op the pair stays: it is what lets onnxruntime run that op as an int8 kernel, and
    a mid-network step spent 1783 of 1885 ms in float Conv without it. The deployed model keeps its
    requantization everywhere (only the branches skip it). Mutates `nodes`, which pair (and node) remove anyway."""
    made = {t.name: n for n in nodes for t in n.outputs}
    before_weighted = set()   # ids of nodes with a weighted op downstream (or that are one)
    for node in reversed(nodes):
        if node.op in WEIGHTED or any(id(c) in before_weighted for t in node.outputs for c in t.outputs):
            before_weighted.add(id(node))
    for node in nodes:
        if id(node) in before_weighted:
            continue
        for k, t in enumerate(node.inputs):
            dq = made.get(t.name)
            q = made.get(dq.inputs[0].name) if dq is not None and dq.op == "DequantizeLinear" else None
            if q is not None and q.op == "QuantizeLinear" and not isinstance(q.inputs[0], gs.Constant):
                node.inputs[k] = q.inputs[0]
    return nodes


def writes_logits(graph: gs.Graph, node: gs.Node, tap: str) -> bool:
    """Whether the node's output y is the tap up to a requantization and a bias Add: there dL/dy = dL/dtap
    (the gradient passes a requantization straight through, as the branches read it: pair's requant bypass)."""
    inputs = {id(t) for t in graph.inputs}
    fixed = lambda t: isinstance(t, gs.Constant) or id(t) in inputs or bool(t.inputs) and t.inputs[0].op == \
        "DequantizeLinear" and all(isinstance(i, gs.Constant) or id(i) in inputs for i in t.inputs[0].inputs)
    t = node.outputs[0]
    while t.name != tap:
        if len(t.outputs) != 1:
            return False
        (c,) = t.outputs
        if not (c.op in ("QuantizeLinear", "DequantizeLinear") or c.op == "Add" and all(
                i is t or fixed(i) for i in c.inputs)):
            return False
        t = c.outputs[0]
    return True
