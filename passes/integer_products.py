"""integer_products: the trained layers' products in integers, on int8 kernels (node and head estimators).

A trained weight is training state (int16 at --bits 16), read through a DequantizeLinear, so DQ(x)·DQ(W) ran
as a float Conv/Gemm/MatMul: onnxruntime has no int16 kernel, a Conv whose weight is an input is not
prepacked, and the float sum's rounding is each runtime's own. The node and head estimators run their
branches on the unperturbed weights, so here each such product becomes

    W   = 256·W_hi + W_lo      W_hi = ⌊W / 256⌋, held as uint8 W_hi + 128 (zero point 128), W_lo ∈ [0, 255] uint8;
                              made once per step from the state; an int8 weight is its own single plane
                              (uint8 W + 128, zero point 128): uint8 × uint8 products, which onnxruntime sums
                              exactly on every CPU (graph_ops.Builder.integer_product)
    H   = Σ (x − z_x)·W_hi,   L = Σ (x − z_x)·W_lo     MatMulInteger, int32, exact (a Conv on its im2col rows)
    y   = (f32(H)·256 + f32(L))·f32(s_x·s_w)  (+ bias)   (int8: f32(H)·f32(s_x·s_w))

so the branches run 8-bit kernels (onnxruntime's u8u8 MatMulInteger; the same values everywhere: integer sums,
then IEEE casts, one Mul, one Add and one Mul in that order). With --forward exact the reduction is split into
pieces of K whose partial sums stay below 2^24, added in int32, because OpenVINO's CPU plugin accumulates
MatMulInteger in float32 (verify's runtimes then agree); the integers are the same.

Left as the source gives them (float): grouped Convs, products whose input is not a per-tensor 8-bit
DequantizeLinear, weights with a zero point or a per-channel scale on another axis than the output's.

Precondition: the training graph after node/head and update (trained weights are state inputs).
Postcondition: with --estimator node or head, every product that reads a trained weight through its
DequantizeLinear (in the graph and in Loop bodies) is rewritten as above and writes the same tensor.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .context import Context, Pass
from .exact_forward import EXACT
from .formulas import Patches, chunk_rows, chunked
from .graph_ops import Builder, channels_last_rows, graphs, optional_input, rows_to_nchw

PRODUCTS = ("Conv", "Gemm", "MatMul")
PLANE_SPAN = 255       # |W_lo| and |W_hi| are at most this (a bound for OpenVINO's float partial sums)
UNSIGNED_ZERO = np.uint8(128)   # the zero point of W_hi + 128 (and of an int8 W + 128)


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    if ctx.spec.estimator not in ("node", "head"):
        return graph
    weights = {ctx.state.inputs[t.name].name: t for t in ctx.trainables if t.role == "weight"}
    images = {layer.weight.name: layer.image for layer in ctx.node or [] if layer.weight is not None}
    main = Builder(graph, "integer_products")
    planes, done, kept = {}, 0, []
    for k, g in enumerate(list(graphs(graph))):
        b = main if k == 0 else Builder(g, f"integer_products_body{k}")
        for node in list(g.nodes):
            if node.op not in PRODUCTS:
                continue
            found = _trained_weight(node, weights)
            if found is None:
                continue
            why = _refusal(node, found)
            if why:
                kept.append(f"{found[1].site} ({why})")
                continue
            dq, tr = found
            key = tr.name
            if key not in planes:
                planes[key] = _planes(graph, main, node, dq)
            _rewrite(b, node, dq, planes[key], images.get(tr.name), ctx.spec.forward == "exact")
            done += 1
    if done or kept:
        ctx.notes.append(f"the trained layers' products run on int8 kernels ({done} products)" +
                         (f"; in float: {', '.join(sorted(set(kept)))}" if kept else ""))
    return graph


def _trained_weight(node: gs.Node, weights: dict):
    """(its weight's DequantizeLinear, the Trainable) when the product reads a trained weight, else None."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    dq = w.inputs[0] if w is not None and len(w.inputs) == 1 else None
    if dq is None or dq.op != "DequantizeLinear" or dq.inputs[0].name not in weights:
        return None
    return dq, weights[dq.inputs[0].name]


def _input(node: gs.Node):
    """(q, its scale as float32, its zero point constant) when the product's input is DequantizeLinear(q) of an
    8-bit q with a constant per-tensor scale, else None."""
    x = node.inputs[0]
    dq = x.inputs[0] if len(x.inputs) == 1 else None
    if dq is None or dq.op != "DequantizeLinear" or not isinstance(dq.inputs[1], gs.Constant) or \
            dq.inputs[1].values.size != 1 or np.dtype(dq.inputs[0].dtype) not in (np.int8, np.uint8):
        return None
    zp = optional_input(dq, 2)
    if zp is not None and not isinstance(zp, gs.Constant):
        return None
    return dq.inputs[0], dq.inputs[1].values.reshape(()).astype(np.float32), \
        zp if zp is not None else gs.Constant(f"{dq.name}__zero", np.zeros((), np.dtype(dq.inputs[0].dtype)))


def _out_axis(node: gs.Node) -> int:
    return {"Conv": 0, "Gemm": 0 if node.attrs.get("transB", 0) else 1, "MatMul": 1}[node.op]


def _refusal(node: gs.Node, found) -> str | None:
    dq, tr = found
    wq, scale, zp = dq.inputs[0], dq.inputs[1], optional_input(dq, 2)
    if np.dtype(wq.dtype) not in (np.int8, np.int16):
        return f"{wq.dtype} weight"
    if zp is not None and (not isinstance(zp, gs.Constant) or np.any(zp.values != 0)):
        return "weight zero point"
    if not isinstance(scale, gs.Constant):
        return "weight scale not constant"
    rank = len(wq.shape or [])
    if scale.values.size > 1 and dq.attrs.get("axis", 1) % max(rank, 1) != _out_axis(node):
        return "per-channel scale off the output axis"
    if _input(node) is None:
        return "input not a per-tensor 8-bit activation"
    if node.op == "Conv" and (node.attrs.get("group", 1) != 1 or rank != 4 or
                              node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET")):
        return "grouped Conv" if node.attrs.get("group", 1) != 1 else "Conv form"
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 or
                              node.attrs.get("beta", 1.0) != 1.0):
        return "Gemm form"
    if node.op == "MatMul" and rank != 2:
        return "batched MatMul"
    return None


def _planes(graph: gs.Graph, b: Builder, node: gs.Node, dq: gs.Node) -> list:
    """The weight as uint8 planes [K, O] (K: its reduction, a Conv's in its rows' (i, j, c) order; O: its
    outputs): [W + 128] for int8, else [W_hi + 128, W_lo]. A weight over formulas.CHUNK elements is split a chunk of
    output rows at a time in a Loop, so the split's int32 temporaries hold one chunk and no int16 copy is made."""
    w, shape = dq.inputs[0], list(dq.inputs[0].shape)
    nk = node.op == "Conv" or node.op == "Gemm" and node.attrs.get("transB", 0)
    rows = [shape[0], int(np.prod(shape[1:]))] if nk else shape                     # [O, K], or [K, O]

    def planes(bb: Builder, t):     # a chunk [r, K'] (a Conv's as [r, C, kh, kw]) → its planes, (i, j, c) order
        if node.op == "Conv":       # per output row [C, kh·kw] → [kh·kw, C]: a transpose onnxruntime runs fast
            t = bb.op("Reshape", [t, np.array([-1, shape[1], int(np.prod(shape[2:]))], np.int64)], dtype=t.dtype)
            t = bb.op("Reshape", [bb.op("Transpose", [t], {"perm": [0, 2, 1]}, dtype=t.dtype),
                                  np.array([-1, rows[1]], np.int64)], dtype=t.dtype)
        return [_offset(bb, t)] if np.dtype(t.dtype) == np.int8 else _split(bb, t)

    # [O, K] → [K, O] after the Loop: inside it onnxruntime would merge the two transposes into one 4-D perm,
    # which it runs 10x slower
    kn = (lambda t: b.op("Transpose", [t], {"perm": [1, 0]}, dtype=t.dtype, hint="kn")) if nk else (lambda t: t)
    count = chunk_rows(rows) if chunked(rows) and np.dtype(w.dtype) != np.int8 else None
    if count is None:
        return [kn(p) for p in planes(b, b.op("Reshape", [w, np.array(rows, np.int64)], dtype=w.dtype))]
    body = gs.Graph(name="integer_products_split")
    bb = Builder(body, b.name("split_body"))
    k = gs.Variable(bb.name("k"), dtype=np.int64, shape=[])
    cond = gs.Variable(bb.name("cond"), dtype=bool, shape=[])
    body.inputs = [k, cond]
    chunks = b.op("Reshape", [w, np.array([rows[0] // count, count, rows[1]], np.int64)], dtype=w.dtype)
    body.outputs = [bb.op("Identity", [cond], dtype=bool, shape=[])] + planes(
        bb, bb.op("Gather", [chunks, k], {"axis": 0}, dtype=w.dtype))
    scanned = [gs.Variable(b.name("plane_chunks"), dtype=np.uint8) for _ in range(2)]
    graph.nodes.append(gs.Node("Loop", b.name("split"), {"body": body},
                               [b.const(np.array(rows[0] // count, np.int64)), b.const(np.array(True))], scanned))
    return [kn(b.op("Reshape", [t, np.array(rows, np.int64)], dtype=np.uint8)) for t in scanned]


def _offset(b: Builder, w) -> gs.Tensor:
    """uint8 W + 128 of an int8 W."""
    return b.cast(b.i32.Add(b.cast(w, np.int32), 128, hint="w_offset"), np.uint8, hint="w_u8")


def _split(b: Builder, w) -> list:
    """[W_hi + 128, W_lo] uint8 of an int16 W."""
    w32 = b.cast(w, np.int32)
    hi = b.i32.Div(b.i32.Add(w32, 32768), 256, hint="w_hi")                           # ⌊W/256⌋ + 128: Div truncates, W + 2^15 >= 0
    lo = b.i32.Sub(w32, b.i32.Mul(b.i32.Sub(hi, 128), 256), hint="w_lo")               # W_lo ∈ [0, 255]
    return [b.cast(hi, np.uint8, hint="w_hi8"), b.cast(lo, np.uint8, hint="w_lo8")]


def _piece(k: int, span: int) -> int:
    """The largest divisor of K whose partial sums of |x − z|·|plane| <= span·PLANE_SPAN stay below 2^24."""
    bound = max((EXACT - 1) // (span * PLANE_SPAN), 1)
    return max(d for d in range(1, min(k, bound) + 1) if k % d == 0)


def _rewrite(b: Builder, node: gs.Node, dq: gs.Node, planes: list, image, exact: bool) -> None:
    q, sx, zx = _input(node)
    out = node.outputs[0]
    if node.op == "Conv":
        shape = dq.inputs[0].shape
        patches = Patches.of_conv(node.attrs, shape)
        image = image or tuple(node.inputs[0].shape[1:])
        rows = channels_last_rows(b, q, zx, patches, image)
        k = int(np.prod(shape[1:]))
    else:
        k = int(dq.inputs[0].shape[1 if node.op == "Gemm" and node.attrs.get("transB", 0) else 0])
        rows = b.op("Reshape", [q, np.array([-1, k], np.int64)], dtype=q.dtype, hint="rows")
    span = 255 if np.dtype(q.dtype) == np.uint8 else 128
    piece = _piece(k, span) if exact else k
    sums = [_product(b, rows, plane, zx, None if j else UNSIGNED_ZERO, k, piece) for j, plane in enumerate(planes)]
    acc = b.cast(sums[0], np.float32, hint="h")
    if len(sums) > 1:
        acc = b.f32.Add(b.f32.Mul(acc, 256.0), b.cast(sums[1], np.float32, hint="l"), hint="acc")
    scale = np.float32(sx) * dq.inputs[1].values.astype(np.float32).reshape(-1)
    y = b.f32.Mul(acc, b.const(scale if scale.size > 1 else scale.reshape(())), hint="real")
    bias = optional_input(node, 2)
    if bias is not None:
        y = b.f32.Add(y, bias, hint="biased")
    lead = len(q.shape or []) if node.op == "MatMul" else 2
    node.outputs.clear()
    node.inputs.clear()
    b.graph.nodes.remove(node)
    if node.op == "Conv":
        rows_to_nchw(b, y, (*patches.out_size(*image[1:]), shape[0]), out)
    elif lead != 2:     # a MatMul of [..., K]: the rows back to [..., O]
        size = b.op("Concat", [b.op("Slice", [b.op("Shape", [q], dtype=np.int64), np.array([0], np.int64),
                                              np.array([-1], np.int64)], dtype=np.int64),
                               np.array([dq.inputs[0].shape[1]], np.int64)], {"axis": 0}, dtype=np.int64)
        b.graph.nodes.append(gs.Node("Reshape", b.name("shaped"), {}, [y, size], [out]))
    else:
        b.graph.nodes.append(gs.Node("Identity", b.name("out"), {}, [y], [out]))


def _product(b: Builder, rows, plane, zx, zw, k: int, piece: int):
    """Σ_K (rows − z_x)·(plane − z_w) int32 [R, O]; in pieces of K added in int32 when piece < K, one product
    at a time (a batched [K/piece, R, O] product held K/piece accumulators at once)."""
    total = None
    for lo in range(0, k, piece):
        part = lambda x, axis: x if piece == k else b.op(
            "Slice", [x, np.array([lo], np.int64), np.array([lo + piece], np.int64), np.array([axis], np.int64)],
            dtype=x.dtype, hint="piece")
        term = b.integer_product("MatMulInteger", part(rows, -1), part(plane, 0), zx, zw, hint="plane")
        total = term if total is None else b.i32.Add(total, term, hint="pieces_sum")
    return total


PASS = Pass("integer products", run, reads=("trainables", "state", "node"), adds=())
