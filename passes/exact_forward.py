"""exact_forward (--forward exact): the frozen quantized ops compute their integer results with ops that every
runtime evaluates identically, so a step no longer depends on how a runtime rounds its requantizations.

A QDQ op DQ(x)·DQ(w) → Q(y) leaves each runtime to compute the real product in float, in its own order,
and round it: onnxruntime fuses it into an int8 kernel that requantizes one way, its unfused float Conv
and the ONNX reference evaluator another, OpenVINO a third; they differ by 1 LSB on a few values per batch
(`fgcompile verify` names the op), and a step reads those values. Here the same op becomes

    acc = (x − z_x) ⊛ w  (+ b)                                           int32, exact
    y   = QuantizeLinear(f32(acc) · M, 1, z_y),   M = f32(s_x·s_w / s_y)    one rounding of each kind

Every step is exact or rounds once under IEEE rules, and none is a float a·b + c that a runtime could
fuse into one rounding; integers stay below 2^24 where a runtime might compute them in float32 (OpenVINO's
CPU plugin does: its f32 Div is not IEEE either, so nothing divides in float). Per op (docs/reference.md,
"The exact forward", has the formulas):
    Conv, Gemm, MatMul   8-bit MatMulInteger on the input (a Conv of group 1: its channels-last im2col
                         rows), the reduction split into pieces whose 255·Σ|w| stays below 2^24 (OpenVINO
                         accumulates it in float32), added in int32; a grouped Conv or a MatMul of [B, T, K]:
                         a float kernel on the integer values, split likewise (any summation order is then
                         exact); ConvInteger/MatMulInteger whole where one channel alone reaches it; a bias
                         re-gridded to s_x·s_w
    ReduceMean, GlobalAveragePool   Σ(x − z_x) in int32, one requantization
    Add                  int32 fixed point on 2^-K, rounded half up by one floor division
    LayerNormalization   integer sums, one Sqrt, and the output level decided by two exact comparisons
    Softmax              exp by a 256-entry integer table of max − q, the level decided likewise
    MaxPool              on the 8-bit tensor itself (same grid in and out)
Each rewritten op whose intermediates would pass CHUNK_BYTES at NOMINAL_BATCH examples ((2m + 1)× that in a
stacked suffix) runs in slices of the batch (passes/batch_chunks.py), one slice's intermediates at a time:
without them this form took 2-3.7x the inference peak on the 1000-class bench models, QLinearConv's tiling
~1x (benchmarks/README.md, "The exact forward as the default, in batch slices").

What stays as the source gave it: the trained layers (their weights are inputs; the node and head
estimators' run on integer planes, passes/integer_products.py), ops without these forms
(Sigmoid, Gelu, …) and ops whose inputs are not 8-bit QDQ tensors; the compile's note lists them. The
default (--forward qdq) keeps the source's QDQ ops, which onnxruntime fuses into int8 kernels: 1.2-3.8x
faster than this form (benchmarks/README.md, "The exact forward").

Precondition: the training graph after `update` (every trained weight is a graph input, not a constant).
Postcondition: with --forward exact every frozen op of the forms above is rewritten, in the graph and in
Loop bodies; it computes the same model (the QDQ ops' values up to one LSB on a few, where their float
rounding fell on a tie: tests/passes/test_exact_forward.py); nothing changes otherwise.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx_graphsurgeon as gs

from .batch_chunks import chunks_for, in_chunks
from .context import Context, Pass
from .formulas import Patches
from .graph_ops import (Builder, channels_last_rows, downstream_nodes, graphs, grid_level, onnx_dtype, optional_input,
                        rows_to_nchw)

EXACT = 2 ** 24          # float32 adds integers below this exactly, in any order
LIMIT = 2 ** 22          # the fixed-point Add's |sums| + offset stay below 2^23 (< 2^24 with the rounding)
SPAN = 255               # |q − z| of an 8-bit tensor with its zero point in range
PRODUCTS = ("Conv", "Gemm", "MatMul")
MEANS = ("ReduceMean", "GlobalAveragePool")
PASSTHROUGH = ("MaxPool",)   # Q(max DQ(q)) = max q on the same grid: the op runs on the 8-bit tensor itself
CHUNK_BYTES = 8 * 2 ** 20   # a rewritten op's transients per batch slice (batch_chunks): 4 MB halved nothing more
NOMINAL_BATCH = 32          # the batch the slices are sized for (train's default; the graph takes any)


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    if ctx.spec.forward != "exact":
        return graph
    stacked = set()
    if ctx.branches.form == "stacked":     # the branches run along the batch axis: (2m + 1)·B examples there
        weights = {t.name for t in ctx.trainables}
        stacked = set(map(id, downstream_nodes(graph, [t for t in graph.inputs if t.name in weights])))
    done = _rewrite(graph, stacked, 2 * ctx.spec.m + 1)
    frozen = {n.name for n in ctx.source.graph.node} - {t.site for t in ctx.trainables}
    kept = sorted({n.op for g in graphs(graph) for n in g.nodes
                   if n.name in frozen and _float_op(n) and any(t.outputs for t in n.outputs)})   # not left dead
    trained = "on integer planes" if ctx.spec.estimator in ("node", "head") else "in float"
    ctx.notes.append(f"--forward exact: {done} frozen quantized ops compute exactly; the trained layers compute "
                     f"{trained}" + (f"; these frozen ops compute in float: {', '.join(kept)}" if kept else ""))
    return graph


def _rewrite(graph: gs.Graph, stacked: set, branches: int) -> int:
    """Rewrite every op of the forms above; each in batch slices (batch_chunks) where its transients at
    NOMINAL_BATCH examples (times `branches` for the nodes in `stacked`) pass CHUNK_BYTES."""
    count = 0
    for k, g in enumerate(list(graphs(graph))):
        b = Builder(g, "exact" if k == 0 else f"exact_body{k}")   # names are unique across a Loop's scopes
        known = set(map(id, g.nodes))
        for node in list(g.nodes):
            rewrite = REWRITES.get(node.op)
            if rewrite is None or not node.outputs or not node.inputs:    # (or a QuantizeLinear one took)
                continue
            out, per_item = _output(node), _transient_bytes(node)
            leading = out.shape[0] if out.shape and isinstance(out.shape[0], int) else \
                NOMINAL_BATCH * (branches if id(node) in stacked else 1)
            made = rewrite(b, node)
            count += bool(made)
            if made and per_item:
                in_chunks(b, _added(g, known), out, chunks_for(leading, per_item, CHUNK_BYTES))
            known.update(map(id, _added(g, known)))
    return count


def _added(g: gs.Graph, known: set) -> list[gs.Node]:
    """The nodes at the end of g that are not in `known` (a rewrite appends its nodes), in order."""
    return list(reversed(list(itertools.takewhile(lambda n: id(n) not in known, reversed(g.nodes)))))


def _output(node: gs.Node) -> gs.Variable:
    """The tensor a rewrite of `node` writes: its QuantizeLinear's output, else its own."""
    q = _requant_target(node)
    return (q or node).outputs[0]


def _transient_bytes(node: gs.Node) -> float | None:
    """Bytes per item of the output's leading axis of the intermediates a rewrite of `node` makes (None when
    the output's rank is unknown): a Conv's rows (taps × its 8-bit input; the output's size where the input's
    is unknown) and, per output value, an int32 accumulator and two float32 tensors. A batch axis after the
    first counts NOMINAL_BATCH."""
    y = _output(node).shape
    if not y:
        return None
    x = node.inputs[0].shape if node.inputs[0].shape and len(node.inputs[0].shape) == len(y) else y
    size = lambda shape: float(np.prod([d if isinstance(d, int) else NOMINAL_BATCH for d in shape[1:]]))
    w = node.inputs[1].shape if node.op == "Conv" and len(node.inputs) > 1 else None
    taps = int(np.prod(w[2:])) if w and all(isinstance(d, int) for d in w) else 1
    return taps * size(x) + 12 * size(y)


def _float_op(node: gs.Node) -> bool:
    """A node that computes in float (reads a float tensor that is not a shape)."""
    return node.op not in ("QuantizeLinear", "DequantizeLinear", "Reshape", "Transpose", "Flatten", "Squeeze",
                           "Unsqueeze", "Identity", "Shape", "MaxPool", "Concat", "Slice", "Gather") and any(
        np.dtype(t.dtype) == np.float32 for t in node.outputs if t.dtype is not None)


def _quantized(t: gs.Tensor):
    """(q, scale, zero point) when t = DequantizeLinear(q) of an 8-bit q with a constant per-tensor scale
    (or, for a constant q, per-channel; a constant int32 q below 2^24, a bias, too), else None."""
    dq = t.inputs[0] if len(t.inputs) == 1 else None
    if dq is None or dq.op != "DequantizeLinear" or not isinstance(dq.inputs[1], gs.Constant):
        return None
    q, zp = dq.inputs[0], optional_input(dq, 2)
    small = isinstance(q, gs.Constant) and q.values.dtype == np.int32 and np.abs(q.values).max(initial=0) < EXACT
    if np.dtype(q.dtype) not in (np.int8, np.uint8) and not small or zp is not None and not isinstance(zp, gs.Constant):
        return None
    scale = dq.inputs[1].values.astype(np.float64)
    if scale.size > 1 and not isinstance(q, gs.Constant):
        return None
    z = zp.values.astype(np.int64) if zp is not None else np.zeros(scale.shape, np.int64)
    return q, scale, z


def _requant_target(node: gs.Node):
    """The QuantizeLinear that alone reads the node's output (constant per-tensor 8-bit scale/zp), or None."""
    out = node.outputs[0]
    if len(out.outputs) != 1:
        return None
    q = out.outputs[0]
    zp = optional_input(q, 2)
    if q.op != "QuantizeLinear" or not isinstance(q.inputs[1], gs.Constant) or q.inputs[1].values.size != 1 or \
            not isinstance(zp, gs.Constant) or zp.values.dtype not in (np.int8, np.uint8):
        return None
    return q


def _finish(b: Builder, node: gs.Node, acc, scale: np.ndarray, channel_shape, rows_of=None) -> None:
    """acc (int32, exact) in units of `scale` → the node's requantized output (its QuantizeLinear's tensor), or
    its float output when no QuantizeLinear alone reads it. rows_of = (H', W', O): acc is a Conv's rows
    [B·H'·W', O], requantized as rows and only then made [B, O, H', W'] (a quarter of the bytes to move)."""
    accf = b.cast(acc, np.float32, hint="acc_f32")
    q = _requant_target(node)
    if q is None:
        out = node.outputs[0]
        _drop(b.graph, node)
        if rows_of is None:
            b.graph.nodes.append(gs.Node("Mul", b.name("real"), {}, [accf, b.const(_shaped(scale, channel_shape))],
                                         [out]))
        else:
            rows_to_nchw(b, b.f32.Mul(accf, b.const(_shaped(scale, channel_shape)), hint="real"), rows_of, out)
        return
    multiplier = scale / q.inputs[1].values.astype(np.float64).reshape(())
    y = b.f32.Mul(accf, b.const(_shaped(multiplier, channel_shape)), hint="requant")
    _requantized(b, node, q, y, rows_of)


def _requantized(b: Builder, node: gs.Node, q: gs.Node, y, rows_of=None) -> None:
    """y (float, in output LSBs) rounded to the QuantizeLinear's zero point, written to its output tensor."""
    inputs = [y, b.const(np.float32(1.0)), q.inputs[2]]
    if rows_of is None:
        _replace(b, node, q, "QuantizeLinear", inputs)
    else:
        _replace(b, node, q, "Identity", [rows_to_nchw(b, b.op("QuantizeLinear", inputs,
                                                                dtype=q.inputs[2].values.dtype), rows_of)])


def _on_grid_int32(b: Builder, node: gs.Node, q: gs.Node, y) -> None:
    """y (int32, already on the QuantizeLinear's grid) cast to its dtype, written to its output tensor."""
    _replace(b, node, q, "Cast", [y], {"to": onnx_dtype(q.inputs[2].values.dtype)})


def _replace(b: Builder, node: gs.Node, q: gs.Node, op: str, inputs, attrs=None) -> None:
    """One `op` node writes the QuantizeLinear's output tensor; the node and that QuantizeLinear leave."""
    out = q.outputs[0]
    _drop(b.graph, node, q)
    b.graph.nodes.append(gs.Node(op, b.name("quantized"), attrs or {}, inputs, [out]))


def _drop(graph: gs.Graph, *nodes: gs.Node) -> None:
    for node in nodes:
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.remove(node)


def _shaped(values: np.ndarray, channel_shape) -> np.ndarray:
    v = values.astype(np.float32)
    return v.reshape(channel_shape) if v.size > 1 else v.reshape(())


def _product(b: Builder, node: gs.Node) -> bool:
    x, w = _quantized(node.inputs[0]), _quantized(node.inputs[1])
    if x is None or w is None or x[1].size != 1:
        return False
    xq, sx, zx = x
    wq, sw, zw = w
    activations = not isinstance(wq, gs.Constant)
    if activations and (node.op != "MatMul" or sw.size != 1):
        return False
    if not activations and (np.any(zw != 0) or (len(wq.shape) < 3 if node.op == "Conv" else len(wq.shape) != 2)):
        return False     # symmetric weights (every toolchain's int8 weights); a Conv kernel, else a matrix
    attrs = dict(node.attrs)
    if node.op == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
        return False
    rank = len(wq.shape) if wq.shape else 0
    out_axis = {"Conv": 0, "Gemm": 0 if attrs.get("transB", 0) else 1, "MatMul": rank - 1}[node.op]
    if sw.size > 1 and node.inputs[1].inputs[0].attrs.get("axis", 1) % rank != out_axis:
        return False    # a per-channel scale along an axis that is not the output's
    channel_shape = [-1] + [1] * (rank - 2) if node.op == "Conv" else [-1]
    bias = optional_input(node, 2)
    if bias is not None:
        qb = bias.inputs[0] if len(bias.inputs) == 1 else None
        if qb is None or qb.op != "DequantizeLinear" or not all(isinstance(i, gs.Constant) for i in qb.inputs[:2]):
            return False
        units = sx * sw   # the bias re-gridded to the accumulator's units (the same values when its scale is s_x·s_w)
        bias_units = np.rint(qb.inputs[0].values.astype(np.float64) * qb.inputs[1].values.astype(np.float64) /
                             units.astype(np.float32).astype(np.float64))
        if np.abs(bias_units).max(initial=0) >= 2 ** 31:
            return False
    acc, rows_of = _accumulate(b, node, x, w, attrs, out_axis)
    channel_shape = [-1] if rows_of else channel_shape     # a Conv's rows: the channels are the last axis
    if bias is not None:
        acc = b.i32.Add(acc, b.const(bias_units.astype(np.int32).reshape(channel_shape)), hint="bias")
    _finish(b, node, acc, sx * sw, channel_shape, rows_of)
    return True


def _accumulate(b: Builder, node: gs.Node, x, w, attrs: dict, out_axis: int):
    """(Σ (q_x − z_x)·(q_w − z_w) as int32, None), or (its rows, (H', W', O)) for a Conv on its im2col rows
    (_integer_rows). Float kernels on the integer values where every partial sum
    stays below 2^24, the reduction split into pieces (input channels, or K) that each do, and the pieces
    added in int32; ConvInteger/MatMulInteger where one channel alone could reach it (or, between two
    activations, K > 258)."""
    (xq, _, zx), (wq, _, zw) = x, w
    zero = lambda q, z: b.const(z.astype(np.dtype(q.dtype)).reshape(()))
    xf = lambda: b.op("DequantizeLinear", [xq, b.const(np.float32(1.0)), zero(xq, zx)], dtype=np.float32,
                      hint="centred")
    attrs.pop("axis", None)
    if not isinstance(wq, gs.Constant):     # a MatMul of two activations
        if node.inputs[0].shape and SPAN * SPAN * int(node.inputs[0].shape[-1]) < EXACT:
            wf = b.op("DequantizeLinear", [wq, b.const(np.float32(1.0)), zero(wq, zw)], dtype=np.float32, hint="centred")
            return b.cast(b.op("MatMul", [xf(), wf], dtype=np.float32, hint="product"), np.int32, hint="acc"), None
        return b.integer_product("MatMulInteger", xq, wq, zero(xq, zx), zero(wq, zw)), None
    w = wq.values
    rows = _integer_rows(b, node, xq, zero(xq, zx), w, attrs)
    if rows is not None:
        return rows
    # each output's bound per reduction channel: [outputs, channels]
    reduce_axis = 1 if node.op == "Conv" else 1 - out_axis
    per_channel = SPAN * np.abs(w.astype(np.int64)).sum(axis=tuple(range(2, w.ndim))) if node.op == "Conv" else \
        SPAN * np.abs(w.astype(np.int64)).transpose((out_axis, 1 - out_axis))
    pieces = _pieces(per_channel) if node.op != "Conv" or attrs.get("group", 1) == 1 else \
        ([w.shape[1]] if per_channel.sum(axis=1).max() < EXACT else None)
    if pieces is None:
        if node.op == "Conv":
            return b.integer_product("ConvInteger", xq, wq, zero(xq, zx), attrs=attrs), None
        right = w.T.copy() if attrs.get("transB", 0) else w
        return b.integer_product("MatMulInteger", xq, b.const(right), zero(xq, zx)), None
    inputs = [xf()]
    if len(pieces) > 1:
        inputs = b.op("Split", [inputs[0], np.array(pieces, np.int64)], {"axis": 1 if node.op == "Conv" else -1},
                      dtype=np.float32, hint="pieces", outputs=len(pieces))
    acc, start = None, 0
    for part, size in zip(inputs, pieces):
        piece = np.take(w, np.arange(start, start + size), axis=reduce_axis).astype(np.float32)
        start += size
        term = b.cast(b.op(node.op, [part, b.const(piece, "weight")], attrs, dtype=np.float32, hint="product"),
                      np.int32, hint="acc")
        acc = term if acc is None else b.i32.Add(acc, term, hint="pieces_sum")
    return acc, None


# below this many input channels a Conv keeps float kernels: its im2col Gather copies too few values per tap
# (the keyword spotter's 1-channel stem: 1.4 ms of Gather in a 9 ms step, against 0.2 ms as a float Conv)
FEW_CHANNELS = 8


def _integer_rows(b: Builder, node: gs.Node, xq, zx, w: np.ndarray, attrs: dict):
    """(acc int32, rows_of): a constant-weight product from 8-bit MatMulInteger, the reduction in contiguous
    pieces whose |partial sums| stay below 2^24 (OpenVINO accumulates MatMulInteger in float32), added in
    int32: a Gemm or 2-D MatMul on its input (rows_of None), a Conv of group 1 with a static input on its
    channels-last im2col rows (rows_of = (H', W', O): _finish makes them [B, O, H', W'] after the
    requantization, in a quarter of the bytes). None for other forms (grouped Convs), which keep the float
    kernels. onnxruntime runs these integer GEMMs several times faster than float kernels on the same integers."""
    image = node.inputs[0].shape[1:] if node.inputs[0].shape else None
    if node.op == "Conv":
        if attrs.get("group", 1) != 1 or w.ndim != 4 or not image or not all(isinstance(d, int) for d in image) \
                or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or w.shape[1] < FEW_CHANNELS:
            return None
        patches = Patches.of_conv(attrs, w.shape)
        right = w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])             # [kh·kw·C, O]: the rows' (i, j, c)
        left = channels_last_rows(b, xq, zx, patches, tuple(image))
    elif len(node.inputs[0].shape or []) == 2:
        right = w.T if attrs.get("transB", 0) else w                          # [K, O]
        left = xq
    else:       # a MatMul of [B, T, K]: with MatMulInteger there OpenVINO f32 differed in the transformer's step
        return None     # (where, inside its fused graph, is not isolated): it keeps the float kernels
    pieces = _pieces(SPAN * np.abs(right.astype(np.int64)).T)
    if pieces is None:
        return None
    acc, start = None, 0
    for size in pieces:
        part = left if len(pieces) == 1 else b.op(
            "Slice", [left, np.array([start], np.int64), np.array([start + size], np.int64), np.array([1], np.int64)],
            dtype=left.dtype)
        term = b.integer_product("MatMulInteger", part, b.const(np.ascontiguousarray(right[start:start + size]), "weight"),
                                 zx)
        start += size
        acc = term if acc is None else b.i32.Add(acc, term, hint="pieces_sum")
    return acc, (*patches.out_size(*image[1:]), w.shape[0]) if node.op == "Conv" else None


def _pieces(per_channel: np.ndarray) -> list[int] | None:
    """Contiguous channel counts whose summed bound stays below 2^24 for every output (greedy), or None
    when one channel alone reaches it."""
    if per_channel.max(initial=0) >= EXACT:
        return None
    pieces, total = [0], np.zeros(per_channel.shape[0], np.int64)
    for column in per_channel.T:
        if (total + column).max() >= EXACT:
            pieces.append(0)
            total[:] = 0
        total += column
        pieces[-1] += 1
    return pieces


def _mean(b: Builder, node: gs.Node) -> bool:
    x = _quantized(node.inputs[0])
    shape = node.inputs[0].shape
    if x is None or _requant_target(node) is None or not shape:
        return False
    xq, sx, zx = x
    if node.op == "GlobalAveragePool":
        axes, keep = list(range(2, len(shape))), 1
    else:
        given = optional_input(node, 1)
        axes = given.values.tolist() if isinstance(given, gs.Constant) else node.attrs.get("axes")
        keep = node.attrs.get("keepdims", 1)
        if axes is None or not isinstance(given, (gs.Constant, type(None))) or node.attrs.get("noop_with_empty_axes", 0):
            return False
    sizes = [shape[a] for a in axes]
    if not all(isinstance(d, int) for d in sizes):
        return False
    count = int(np.prod(sizes))
    centred = b.i32.Sub(b.as_int32(xq), b.const(zx.astype(np.int32).reshape(())), hint="centred")
    total = b.op("ReduceSum", [centred, b.const(np.array(axes, np.int64))], {"keepdims": keep}, dtype=np.int32,
                 hint="sum")
    _finish(b, node, total, sx / count, [-1])
    return True


def _constant_values(t) -> np.ndarray | None:
    """A constant's values, or DequantizeLinear's of a constant (float64), else None."""
    if isinstance(t, gs.Constant):
        return t.values.astype(np.float64)
    dq = t.inputs[0] if t is not None and len(t.inputs) == 1 else None
    if dq is None or dq.op != "DequantizeLinear" or not all(isinstance(i, gs.Constant) for i in dq.inputs[:2]):
        return None
    zp = optional_input(dq, 2)
    axis = dq.attrs.get("axis", 1)
    q, s = dq.inputs[0].values.astype(np.float64), dq.inputs[1].values.astype(np.float64)
    z = zp.values.astype(np.float64) if zp is not None else 0.0
    if s.size > 1:     # per-channel: along `axis` of q
        shape = [1] * q.ndim
        shape[axis % q.ndim] = -1
        s, z = s.reshape(shape), np.reshape(z, shape) if np.size(z) > 1 else z
    return (q - z) * s


def _layer_norm(b: Builder, node: gs.Node) -> bool:
    """LayerNormalization over the last axis of a requantized tensor, read by one QuantizeLinear. With
    X = q − z_x, S1 = ΣX, S2 = ΣX² (below 2^24: D <= 258), num = D·X − S1 (int32, exact) and
    den = sqrt(f32(D·S2 − S1²) + f32(D²·ε/s_x²)) (_variance), y is the largest q of the output grid with
        (f32(q) − f32(z_y + β/s_y + ½))·den ≤ f32(γ/s_y)·f32(num)
    (else its lowest): round-half-up of γ·(x − μ)/σ / s_y + β/s_y + z_y. A division only guesses it (a runtime
    may divide by reciprocal: OpenVINO's f32 Div differs from IEEE on a quarter of values); two comparisons
    decide (_level), and no a·b + c decides anything (an FMA would round once): Sqrt, Sub and Mul round once
    each, the comparisons are exact."""
    x, q = _quantized(node.inputs[0]), _requant_target(node)
    shape = node.inputs[0].shape
    if x is None or q is None or isinstance(x[0], gs.Constant) or x[1].size != 1 or not shape or \
            not isinstance(shape[-1], int) or node.attrs.get("axis", -1) % len(shape) != len(shape) - 1 or \
            len([t for t in node.outputs if t.outputs]) > 1 or node.outputs[0] is not q.inputs[0]:
        return False
    d = int(shape[-1])
    gamma = _constant_values(node.inputs[1])
    beta = _constant_values(optional_input(node, 2)) if optional_input(node, 2) is not None else np.zeros(1)
    if gamma is None or beta is None or d * SPAN * SPAN >= EXACT:   # S2 below 2^24
        return False
    xq, sx, zx = x
    sy = q.inputs[1].values.astype(np.float64).reshape(())
    zp = q.inputs[2].values
    eps = float(node.attrs.get("epsilon", 1e-5))
    centred = b.i32.Sub(b.as_int32(xq), np.int32(zx.reshape(())), hint="centred")
    axes = np.array([len(shape) - 1], np.int64)     # the last axis, named positively (batch_chunks.separable)
    s1 = b.op("ReduceSum", [centred, axes], {"keepdims": 1}, dtype=np.int32, hint="sum")
    s2 = b.op("ReduceSum", [b.i32.Mul(centred, centred, hint="square"), axes], {"keepdims": 1}, dtype=np.int32,
              hint="sum_squares")
    num = b.i32.Sub(b.i32.Mul(centred, np.int32(d), hint="scaled"), s1, hint="num")
    den = b.f32.Sqrt(b.f32.Add(_variance(b, s1, s2, d), np.float32(d * d * eps / float(sx.reshape(())) ** 2),
                               hint="var_eps"), hint="den")
    target = b.f32.Mul(b.cast(num, np.float32), b.const((gamma / sy).astype(np.float32).reshape(-1)), hint="gamma")
    offset = b.const((int(zp) + beta / sy + 0.5).astype(np.float32).reshape(-1), "offset")
    approx = b.f32.Add(b.f32.Div(target, den, hint="normalized"), offset, hint="approx")
    y = _level(b, q, approx, lambda cand: b.op("LessOrEqual", [b.f32.Mul(b.f32.Sub(b.cast(cand, np.float32), offset,
                                                                                   hint="level"), den,
                                                                         hint="level_scaled"), target],
                                               dtype=np.bool_, hint="below"))
    _on_grid_int32(b, node, q, y)
    return True


def _variance(b: Builder, s1, s2, d: int):
    """f32(D·S2 − S1²), rounded once, with every integer below 2^24 on the way (OpenVINO's CPU plugin
    computes int32 arithmetic through float32 in places): S1 = 64·h + l and S2 = 4096·H + L split, so
    D·S2 − S1² = 4096·(D·H − h²) + (D·L − 128·h·l − l²), and 4096·A is exact, so even a fused a·b + c
    rounds only the sum."""
    l = b.i32.Mod(s1, np.int32(64), hint="s1_low")
    h = b.i32.Div(b.i32.Sub(s1, l, hint="s1_high64"), np.int32(64), hint="s1_high")
    big_l = b.i32.Mod(s2, np.int32(4096), hint="s2_low")
    big_h = b.i32.Div(b.i32.Sub(s2, big_l, hint="s2_high4096"), np.int32(4096), hint="s2_high")
    high = b.i32.Sub(b.i32.Mul(big_h, np.int32(d), hint="dh"), b.i32.Mul(h, h, hint="hh"), hint="var_high")
    low = b.i32.Sub(b.i32.Sub(b.i32.Mul(big_l, np.int32(d), hint="dl"),
                              b.i32.Mul(b.i32.Mul(h, l, hint="hl"), np.int32(128), hint="hl128"), hint="var_mid"),
                    b.i32.Mul(l, l, hint="ll"), hint="var_low")
    return b.f32.Add(b.f32.Mul(b.cast(high, np.float32), np.float32(4096), hint="var_high_scaled"),
                     b.cast(low, np.float32), hint="var")


def _level(b: Builder, q: gs.Node, approx, below):
    """graph_ops.grid_level on the QuantizeLinear q's grid."""
    info = np.iinfo(q.inputs[2].values.dtype)
    return grid_level(b, int(info.min), int(info.max), approx, below)


def _softmax(b: Builder, node: gs.Node) -> bool:
    """Softmax over the last axis of c·x for a requantized x (c a constant scalar, 1 without it), read by one
    QuantizeLinear. With d = max q − q (0..255) and E = T[d], T[d] = rint(2^k·exp(−d·s_x·c)) (int32, k
    keeping ΣE below 2^24), S = ΣE, y is the largest q of the output grid with
        (f32(q) − f32(z_y + ½))·f32(f32(S)·s_y) ≤ f32(E):
    round-half-up of E/S/s_y + z_y, decided by comparisons (a division only guesses it: _level)."""
    q = _requant_target(node)
    source, scale = node.inputs[0], 1.0
    if len(source.inputs) == 1 and source.inputs[0].op == "Mul":
        mul = source.inputs[0]
        const = [t for t in mul.inputs if isinstance(t, gs.Constant)]
        other = [t for t in mul.inputs if not isinstance(t, gs.Constant)]
        if len(const) != 1 or len(other) != 1 or const[0].values.size != 1 or len(source.outputs) != 1:
            return False
        source, scale = other[0], float(const[0].values.reshape(()))
    x, shape = _quantized(source), node.inputs[0].shape
    if x is None or q is None or isinstance(x[0], gs.Constant) or x[1].size != 1 or not shape or \
            not isinstance(shape[-1], int) or node.attrs.get("axis", -1) % len(shape) != len(shape) - 1:
        return False
    n = int(shape[-1])
    k = min(20, int(np.floor(np.log2((EXACT - 1) / n))))
    if k < 8:
        return False
    xq, sx = x[0], float(x[1].reshape(()))
    table = np.rint(2.0 ** k * np.exp(-np.arange(256) * sx * scale)).astype(np.int32)
    xi = b.as_int32(xq)
    last = np.array([len(shape) - 1], np.int64)     # named positively (batch_chunks.separable)
    gap = b.i32.Sub(b.op("ReduceMax", [xi, last], {"keepdims": 1}, dtype=np.int32, hint="max"),
                    xi, hint="gap")
    e = b.op("Gather", [b.const(table, "exp_table"), gap], {"axis": 0}, dtype=np.int32, hint="exp")
    total = b.op("ReduceSum", [e, last], {"keepdims": 1}, dtype=np.int32, hint="sum")
    unit = b.f32.Mul(b.cast(total, np.float32), np.float32(q.inputs[1].values.reshape(())), hint="unit")
    ef = b.cast(e, np.float32, hint="exp_f32")
    offset = np.float32(int(q.inputs[2].values) + 0.5)
    below = lambda cand: b.op("LessOrEqual", [b.f32.Mul(b.f32.Sub(b.cast(cand, np.float32), offset, hint="level"),
                                                        unit, hint="level_scaled"), ef], dtype=np.bool_, hint="below")
    y = _level(b, q, b.f32.Add(b.f32.Div(ef, unit, hint="share"), offset, hint="approx"), below)
    _on_grid_int32(b, node, q, y)
    return True


def _on_grid(b: Builder, node: gs.Node) -> bool:
    """DQ → MaxPool → Q with the same scale and zero point: MaxPool of the 8-bit tensor (exact; onnxruntime
    runs it as its int8 kernel where the float one is 60x slower)."""
    x, q = _quantized(node.inputs[0]), _requant_target(node)
    if x is None or q is None or len(node.outputs) != 1 or isinstance(x[0], gs.Constant) or \
            np.float32(x[1].reshape(())) != np.float32(q.inputs[1].values.reshape(())) or \
            int(x[2].reshape(())) != int(q.inputs[2].values.reshape(())) or np.dtype(x[0].dtype) != q.inputs[2].values.dtype:
        return False
    _replace(b, node, q, node.op, [x[0]], dict(node.attrs))
    return True


def _add(b: Builder, node: gs.Node) -> bool:
    """y = round(r_a·(a − z_a) + r_c·(c − z_c)) + z_y with r = s/s_y, in int32 fixed point: each r becomes an
    integer multiplier on 2^-K, a constant operand its value on that grid, and the rounding is half up by one
    floor division. No step rounds but the last, so no runtime's fusion (an FMA, a folded scale) can change
    it, as it could a float a·r_a + c·r_c. K is as large as keeps every integer below 2^24: OpenVINO's CPU
    plugin computes integer Mul/Add/Div through float32, exact only there."""
    operands = [_quantized(t) for t in node.inputs[:2]]
    q = _requant_target(node)
    if q is None or any(o is None or o[1].size != 1 and not isinstance(o[0], gs.Constant) for o in operands):
        return False
    sy = q.inputs[1].values.astype(np.float64).reshape(())
    fixed = sum(((o[0].values - o[2]) * o[1] / sy for o in operands if isinstance(o[0], gs.Constant)), np.float64(0))
    moving = [o for o in operands if not isinstance(o[0], gs.Constant)]
    span = SPAN * sum(float(o[1].reshape(()) / sy) for o in moving) + float(np.abs(fixed).max(initial=0))
    k = min(20, int(np.floor(np.log2(LIMIT / 2 / max(span + 1, 1e-30)))))
    if k < 8:            # multipliers coarser than 2^-8: leave the Add as the source gives it
        return False
    offset = LIMIT // 2  # a multiple of 2^K that makes the floor division's dividend non-negative
    total = b.const((np.rint(fixed * 2.0 ** k) + 2 ** (k - 1) + offset).astype(np.int32), "fixed")
    for qt, s, z in moving:
        centred = b.i32.Sub(b.as_int32(qt), b.const(z.astype(np.int32).reshape(())), hint="centred")
        term = b.i32.Mul(centred, b.const(np.int32(np.rint(s.reshape(()) / sy * 2.0 ** k))), hint="term")
        total = b.i32.Add(total, term, hint="sum")
    zp = q.inputs[2].values
    info = np.iinfo(zp.dtype)
    y = b.i32.Add(b.i32.Div(total, np.int32(2 ** k), hint="floor"), np.int32(int(zp) - offset // 2 ** k),
                  hint="zero_point")
    y = b.clip_int32(y, int(info.min), int(info.max))
    _on_grid_int32(b, node, q, y)
    return True


REWRITES = {**dict.fromkeys(PRODUCTS, _product), **dict.fromkeys(MEANS, _mean),
            **dict.fromkeys(PASSTHROUGH, _on_grid), "Add": _add, "LayerNormalization": _layer_norm,
            "Softmax": _softmax}     # op → its rewrite (False where the node has no exact form)

PASS = Pass("exact forward", run, reads=("spec", "notes", "source", "trainables", "branches"))
