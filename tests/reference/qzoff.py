"""An independent numpy reference of one QZO-FF step, written from the formulas of docs/reference.md.

It does not import fgcompile's passes. It reads the compiled graph's documented contract (which tensors
train, their grid, the spec) and evaluates losses by running the *original inference model* in
onnxruntime with the perturbed integer weights substituted; everything else (hash, perturbation, sign
estimate, fixed-point update, clipping, widening) is numpy.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

GOLDEN, M1, M2 = 0x9E3779B9, 0x21F0AAAD, 0x735A2D97
STREAM = "fgc-int32/2"
U32 = np.uint64(0xFFFFFFFF)


def mix(x):
    """lowbias32 on unsigned 32-bit words, held in uint64 (numpy-scalar constants keep NumPy 1.x's
    promotion of uint64 with a Python int from turning them into float64)."""
    x = np.atleast_1d(np.asarray(x, dtype=np.uint64)) & U32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(M1)) & U32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(M2)) & U32
    x ^= x >> np.uint64(15)
    return x


WIDTH = {"rademacher": 1, "ternary": 8, "gaussian": 8}


def key(seed: int, step: int, t: int, stream: int) -> int:
    """The stream's key: the seed mixed with the tensor/stream salt, then the step added and mixed."""
    salt = int(mix(((65536 * t + stream + 1) * GOLDEN) % 2 ** 32)[0])
    return int(mix((int(mix((seed % 2 ** 32) ^ salt)[0]) + step) % 2 ** 32)[0])


def chunks(seed: int, step: int, t: int, stream: int, numel: int, k: int) -> np.ndarray:
    """c[j]: the k-bit chunk j mod (32/k) of hash word j div (32/k), lowest bits first."""
    n = 32 // k
    j = np.arange(numel, dtype=np.uint64)
    word = mix(np.uint64(key(seed, step, t, stream)) + (j // np.uint64(n)) * np.uint64(GOLDEN))
    return ((word >> ((j % np.uint64(n)) * np.uint64(k))) & np.uint64((1 << k) - 1)).astype(np.int64)


def perturbation(seed: int, step: int, t: int, stream: int, numel: int, kind: str, density: float) -> np.ndarray:
    c = chunks(seed, step, t, stream, numel, WIDTH[kind])
    if kind == "rademacher":
        return 2 * c - 1
    if kind == "gaussian":
        pop = lambda a: np.array([bin(int(k)).count("1") for k in a.ravel()]).reshape(a.shape)
        return (pop(c & 0xF) - pop(c >> 4)).astype(np.int64)
    keep = (c & 0x7F) < min(max(round(128 * density), 1), 128)
    return (2 * (c >> 7) - 1) * keep


def unfused() -> ort.SessionOptions:
    """Graph optimizations off: the oracle and the compiled graph then run the same float kernels, so a
    pair whose logits are equal gives d = 0 in both (fusion may otherwise move a tie by one ULP)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return opts


def contract(model: onnx.ModelProto) -> dict:
    return json.loads({p.key: p.value for p in model.metadata_props}["fgcompile"])


class InferenceOracle:
    """The source model on the training grids the contract names, with trainables fed as inputs and the
    loss tap as an output. Widening, headroom and preconditioning are docs/reference.md's formulas, coded here
    independently; `matrices` holds the whitening matrices P by name (read from train.onnx)."""

    def __init__(self, source: onnx.ModelProto, c: dict, optimized: bool = False, matrices: dict | None = None,
                 edit=None, threads: int = 0):
        """edit(model, c): a last change to the oracle's model before the requantization bypass (the node
        estimator's noise inputs); threads: onnxruntime's intra-op threads (0: its default)."""
        buffers = [s for s in c["state"] if s["role"] == "momentum"]   # training state, not weights
        c = dict(c, state=parameters(c))
        model = onnx.ModelProto()
        model.CopyFrom(source)
        inits = {i.name: i for i in model.graph.initializer}
        consumers = {n.name: n for n in model.graph.node}
        dq_by_init = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
        dq_by_out = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
        # initializer -> (dtype, F): each widened state tensor (a weight, an 8-bit bias or norm scale) and the
        # int32 bias of a widened Conv/Gemm weight's site (its scale follows the weight's when F > 1)
        todo = {s["name"]: (np.dtype(s["dtype"]), s.get("factor", 256)) for s in c["state"] if s["widened"]}
        for s in c["state"]:
            node = consumers[s["site"]]
            if s["role"] == "weight" and s["widened"] and s.get("factor", 256) > 1 and node.op_type in ("Conv", "Gemm") \
                    and len(node.input) > 2 and node.input[2] in dq_by_out:
                bias = dq_by_out[node.input[2]].input[0]
                if bias not in {t["name"] for t in c["state"]}:  # a trained bias says so itself
                    todo[bias] = (np.dtype(np.int32), s.get("factor", 256))
        for name, (dtype, factor) in todo.items():  # W' = F·W (round half away when F < 1), scale' = scale / F
            dq = dq_by_init[name]
            w = numpy_helper.to_array(inits[name]).astype(np.int64) * factor
            w = np.sign(w) * np.floor(np.abs(w) + 0.5)
            inits[name].CopyFrom(numpy_helper.from_array(w.astype(dtype), name))
            _set_input(model, dq, 1, numpy_helper.to_array(inits[dq.input[1]]) / np.float32(factor), "_ref_grid")
            if len(dq.input) > 2:
                zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.int64) * factor
                _set_input(model, dq, 2, (np.sign(zp) * np.floor(np.abs(zp) + 0.5)).astype(dtype), "_ref_grid")
        self.scales = {}
        for pre in c.get("precondition", []):
            self._precondition(model, inits, c, pre, matrices[pre["matrix"]], consumers, dq_by_init)
        if todo and next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 21:  # int16 DequantizeLinear arrived in opset 21
            model = onnx.version_converter.convert_version(model, 21)
        if edit is not None:
            edit(model, c)
        if c["spec"].get("requant_bypass"):
            _bypass_requant(model, [s["name"] for s in c["state"]])
        self.initial = {s["name"]: numpy_helper.to_array(inits[s["name"]]) for s in c["state"]}
        self.names = [s["name"] for s in c["state"]]
        self.data = c["inputs"]["data"]
        for name, value in self.initial.items():  # an initializer that is also an input can be fed
            model.graph.input.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))
        model.graph.output.append(helper.make_tensor_value_info(c["loss_tap"], onnx.TensorProto.FLOAT, None))
        self.initial.update({s["name"]: np.zeros(s["shape"], np.int32) for s in buffers})   # v starts at 0
        if c["spec"].get("forward") == "exact":   # after the trained tensors became inputs: they stay as they are
            exact_forward(model)
        if c["spec"].get("estimator") in ("node", "head"):
            integer_products(model, c)
        opts = ort.SessionOptions() if optimized else unfused()
        opts.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.model, self.tap = model, c["loss_tap"]

    def _precondition(self, model, inits, c, pre, p, consumers, dq_by_init):
        """The site reads a·P; its weight becomes W' = P⁻¹·W (K×N) on a refit scale
        s'_c = max_k |W'_kc| / (F·qmax), W'_t = clip(round_half_away(W'/s'), qmin, qmax)."""
        s = next(s for s in c["state"] if s["name"] == pre["weight"])
        dq = dq_by_init[s["name"]]
        inits = {i.name: i for i in model.graph.initializer}   # widening added scales
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
        w = numpy_helper.to_array(inits[s["name"]]).astype(np.float64)
        nk = pre["layout"] == "nk"
        w = w * (scale.reshape(-1, 1) if nk and scale.size > 1 else scale)
        kn = np.linalg.inv(p.astype(np.float64)) @ (w.T if nk else w)
        peak = np.abs(kn).max(axis=0) if scale.size > 1 else np.abs(kn).max(keepdims=True)
        qmax = {"int8": 127, "int16": 32767}[s["source_dtype"]] * s.get("factor", 1)
        s_new = (np.maximum(peak, 1e-30) / qmax).astype(np.float32)
        q = kn / s_new.astype(np.float64)
        q = np.clip(np.sign(q) * np.floor(np.abs(q) + 0.5), s["qmin"], s["qmax"])
        inits[s["name"]].CopyFrom(numpy_helper.from_array((q.T if nk else q).astype(s["dtype"]), s["name"]))
        _set_input(model, dq, 1, s_new.reshape(scale.shape), "_ref_pre")
        self.scales[s["name"]] = s_new
        node = consumers[pre["site"]]
        model.graph.initializer.append(numpy_helper.from_array(p.astype(np.float32), pre["matrix"] + "_ref"))
        white = pre["input"] + "_ref_white"
        model.graph.node.insert(list(model.graph.node).index(node),
                                helper.make_node("MatMul", [pre["input"], pre["matrix"] + "_ref"], [white]))
        node.input[0] = white

    def logits(self, x, weights: dict) -> np.ndarray:
        """x: the data array, or a dict of arrays for a model with several data inputs."""
        return self.sess.run([self.tap], {**(x if isinstance(x, dict) else {self.data: x}), **weights})[0]


def _set_input(model, node, k: int, value: np.ndarray, suffix: str) -> None:
    name = node.input[k] + suffix
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    node.input[k] = name


def matrices(train: onnx.ModelProto, c: dict) -> dict:
    """The whitening matrices the contract names, from the training graph's initializers (a Loop body's
    included)."""
    names = {p["matrix"] for p in c.get("precondition", []) + c.get("step_whitening", [])} | \
        {p[k] for p in c.get("step_whitening", []) for k in ("low", "divisors") if p.get(k)}
    graphs, found = [train.graph], {}
    while graphs:
        g = graphs.pop()
        found.update({i.name: numpy_helper.to_array(i) for i in g.initializer if i.name in names})
        graphs += [a.g for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    return found


def _bypass_requant(model: onnx.ModelProto, trained: list[str]) -> None:
    """Downstream of the trained tensors, a node reading DQ(Q(a)) of an activation reads a instead, unless
    a Conv/MatMul/Gemm is that node or lies downstream of it (there the requantization stays)."""
    reached = set(trained)
    for node in model.graph.node:            # topological order
        if any(i in reached for i in node.input):
            reached.update(node.output)
    weighted = {"Conv", "ConvTranspose", "MatMul", "Gemm", "ConvInteger", "MatMulInteger"}
    feeds_weighted = set()                   # tensors from which a weighted op is reachable
    for node in reversed(model.graph.node):
        if node.op_type in weighted or any(o in feeds_weighted for o in node.output):
            feeds_weighted.update(node.input)
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in weighted or any(o in feeds_weighted for o in node.output):
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or name not in reached:
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in reached:
                node.input[k] = q.input[0]


class _Edits:
    """The constants and nodes a reference rewrite adds to graph g, with names unique under `tag`; node()
    appends to .nodes (a rewrite may point it at a fresh list)."""

    def __init__(self, g: onnx.GraphProto, tag: str):
        self.g, self.tag, self.fresh, self.nodes = g, tag, iter(range(10 ** 9)), []

    def const(self, value, hint: str) -> str:
        name = f"{hint}_{self.tag}_{next(self.fresh)}"
        self.g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, ins, **attrs) -> str:
        out = f"{op}_{self.tag}_{next(self.fresh)}"
        self.nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out


def _unsigned(edits: _Edits, w: str, value: np.ndarray | None = None, zw=None) -> tuple[str, str]:
    """(w', z') that read an int8 operand w of ConvInteger/MatMulInteger (zero point zw, default 0) as uint8
    w + 128 with zero point zw + 128, for a product whose other operand is uint8: onnxruntime's uint8 × int8
    kernels add pairs of byte products in saturating int16 on x86 CPUs without AVX-VNNI, its uint8 × uint8
    kernels widen first (int8 × int8 is exact; its ConvInteger of int8 x and uint8 w is wrong, so only there).
    value: w's constant values, else w is a tensor of the graph."""
    z = edits.const(np.asarray(np.int32(0 if zw is None else np.asarray(zw).reshape(())) + 128, np.uint8), "zw_u8")
    if value is not None:
        return edits.const((value.astype(np.int32) + 128).astype(np.uint8), "w_u8"), z
    wide = edits.node("Add", [edits.node("Cast", [w], to=onnx.TensorProto.INT32), edits.const(np.int32(128), "k")])
    return edits.node("Cast", [wide], to=onnx.TensorProto.UINT8), z


def _dtype8(name: str, inits: dict, producer: dict) -> np.dtype:
    """The dtype of an 8-bit tensor: an initializer's, else its QuantizeLinear's zero point's (uint8 without one)."""
    if name in inits:
        return inits[name].dtype
    q = producer.get(name)
    if q is not None and q.op_type == "QuantizeLinear" and len(q.input) > 2 and q.input[2] in inits:
        return inits[q.input[2]].dtype
    return np.dtype(np.uint8)


def exact_forward(model: onnx.ModelProto) -> None:
    """docs/reference.md's exact forward, on the oracle's model: every Conv/Gemm/MatMul, ReduceMean/
    GlobalAveragePool and Add whose operands are DequantizeLinear of 8-bit tensors (a product's weight a
    constant with zero point 0, an Add's constant operand int32 below 2^24 too) computes its integer result:

        product  acc = ConvInteger/MatMulInteger(q_x − z_x, q_w) + rint(q_b·s_b / f32(s_x·s_w))
                 y = QuantizeLinear(f32(acc)·f32(s_x·s_w/s_y), 1, z_y) when one QuantizeLinear reads it,
                 else y = f32(acc)·f32(s_x·s_w)
        mean     y = QuantizeLinear(f32(Σ(q_x − z_x))·f32((s_x/N)/s_y), 1, z_y)
        add      K = min(24, ⌊log2(2^28 / (255·Σ r + max|f|))⌋), r = s/s_y of each tensor operand, f the
                 constant operands' (q − z)·s/s_y; y = clip(⌊(Σ rint(r·2^K)·(q − z) + rint(f·2^K) + 2^(K−1)) / 2^K⌋ + z_y)

    Here the products run as onnxruntime's integer ops (the compiled graph uses float kernels where every
    partial sum stays below 2^24: the same integers)."""
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    fed = {i.name for i in g.input}
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    edits = _Edits(g, "ref_exact")
    const, node = edits.const, edits.node

    def operand(name, weight=False):
        """(q name, q value or None, scale, zero point) of DequantizeLinear(q) with a constant scale."""
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits:
            return None
        q = dq.input[0]
        value = None if q in fed else inits.get(q)    # a trained weight is fed, not a constant
        if len(dq.input) > 2 and dq.input[2] and dq.input[2] not in inits:
            return None                               # a zero point computed in the graph (dynamic quantization)
        zp = inits[dq.input[2]].astype(np.int64) if len(dq.input) > 2 and dq.input[2] else np.int64(0)
        made = producer.get(q)
        dtype = value.dtype if value is not None else inits[made.input[2]].dtype if made is not None and \
            made.op_type == "QuantizeLinear" and len(made.input) > 2 and made.input[2] in inits else None
        if dtype is None:
            return None
        scale = inits[dq.input[1]].astype(np.float64)
        small = value is not None and value.dtype == np.int32 and np.abs(value).max(initial=0) < 2 ** 24
        if np.dtype(dtype) not in (np.int8, np.uint8) and not small or scale.size > 1 and value is None:
            return None
        return q, value, scale, zp

    def requant(n):
        rs = readers.get(n.output[0], [])
        if n.output[0] in outputs or len(rs) != 1 or rs[0].op_type != "QuantizeLinear" or inits[rs[0].input[1]].size != 1:
            return None
        return rs[0]

    replaced, new_for = set(), {}
    for n in list(g.node):
        new = edits.nodes = []
        ops = [operand(i) for i in n.input[:2]] if len(n.input) >= 2 else [operand(n.input[0]) if n.input else None]
        q = requant(n)
        if n.op_type in ("Conv", "Gemm", "MatMul") and ops[0] is not None and ops[1] is not None \
                and ops[0][2].size == 1:
            (xq, _, sx, zx), (wq, wv, sw, zw) = ops
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            if wv is None and (n.op_type != "MatMul" or sw.size != 1) or wv is not None and np.any(zw != 0) or \
                    n.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1 or attrs.get("beta", 1.0) != 1):
                continue
            zero = const(zx.astype(inits[producer[n.input[0]].input[2]].dtype), "zx") if len(producer[n.input[0]].input) > 2 else None
            x_zero = zero or ""
            x_unsigned = _dtype8(xq, inits, producer) == np.uint8
            if n.op_type == "Conv":
                w_in = list(_unsigned(edits, wq, wv)) if wv.dtype == np.int8 and x_unsigned else [wq, ""]
                acc = node("ConvInteger", [xq, w_in[0], x_zero] + w_in[1:], **attrs)
                shape = [-1] + [1] * (wv.ndim - 2)
            else:
                w_dq = producer[n.input[1]]
                zw_dtype = inits[w_dq.input[2]].dtype if len(w_dq.input) > 2 and w_dq.input[2] else None
                if wv is not None:          # a constant weight (zero point 0), transposed for Gemm's transB
                    value = wv.T.copy() if n.op_type == "Gemm" and attrs.get("transB", 0) else wv
                    right, zw_name = _unsigned(edits, wq, value) if value.dtype == np.int8 and x_unsigned else \
                        (const(value, "wt"), "")
                elif zw_dtype == np.int8 and x_unsigned:   # an int8 activation
                    right, zw_name = _unsigned(edits, wq, None, zw)
                else:
                    right, zw_name = wq, const(zw.astype(zw_dtype), "zw") if zw_dtype is not None else ""
                acc = node("MatMulInteger", [xq, right, x_zero] + ([zw_name] if zw_name else []))
                shape = [-1]
            units = (sx * sw).astype(np.float32).astype(np.float64)
            if len(n.input) > 2 and n.input[2]:     # a bias: DequantizeLinear of constants, else the op stays
                dqb = producer.get(n.input[2])
                if dqb is None or dqb.op_type != "DequantizeLinear" or dqb.input[0] not in inits or \
                        dqb.input[1] not in inits:
                    continue
                bias = np.rint(inits[dqb.input[0]].astype(np.float64) * inits[dqb.input[1]].astype(np.float64) / units)
                if np.abs(bias).max(initial=0) >= 2 ** 31:
                    continue
                acc = node("Add", [acc, const(bias.astype(np.int32).reshape(shape), "b")])
            accf = node("Cast", [acc], to=onnx.TensorProto.FLOAT)
            scale = sx * sw
        elif n.op_type in ("ReduceMean", "GlobalAveragePool") and ops[0] is not None and q is not None:
            xq, _, sx, zx = ops[0]
            if len(n.input) > 1 and n.input[1] and n.input[1] not in inits:
                continue                                    # axes computed in the graph: the op stays
            dims = shapes.get(n.input[0]) or next(([d.dim_value for d in v.type.tensor_type.shape.dim]
                                                   for v in g.input if v.name == n.input[0]), None)
            axes = list(range(2, len(dims))) if n.op_type == "GlobalAveragePool" else (
                inits[n.input[1]].tolist() if len(n.input) > 1 else [a.ints for a in n.attribute if a.name == "axes"][0])
            if not dims or any(not dims[a] for a in axes):
                continue
            keep = next((a.i for a in n.attribute if a.name == "keepdims"), 1)
            centred = node("Sub", [node("Cast", [xq], to=onnx.TensorProto.INT32), const(np.int32(zx), "zx")])
            accf = node("Cast", [node("ReduceSum", [centred, const(np.array(axes, np.int64), "axes")], keepdims=keep)],
                        to=onnx.TensorProto.FLOAT)
            scale, shape = sx / int(np.prod([dims[a] for a in axes])), [-1]
        elif n.op_type == "Add" and None not in ops and q is not None and all(
                o[1] is not None or o[2].size == 1 for o in ops):
            sy = float(inits[q.input[1]].reshape(()))
            fixed = sum(((o[1] - o[3]) * o[2] / sy for o in ops if o[1] is not None), np.float64(0))
            moving = [o for o in ops if o[1] is None]
            k = min(20, int(np.floor(np.log2(2 ** 21 / (255 * sum(float(o[2]) / sy for o in moving) +
                                                      float(np.abs(fixed).max(initial=0)) + 1)))))
            if k < 8:
                continue
            total = const((np.rint(fixed * 2.0 ** k) + 2 ** (k - 1)).astype(np.int32), "fixed")
            for oq, _, os_, oz in moving:
                centred = node("Sub", [node("Cast", [oq], to=onnx.TensorProto.INT32), const(np.int32(oz), "z")])
                total = node("Add", [total, node("Mul", [centred, const(np.int32(np.rint(float(os_) / sy * 2.0 ** k)), "r")])])
            zy = inits[q.input[2]]
            step = const(np.int32(2 ** k), "k")     # ⌊t / 2^K⌋ = (t − (t mod 2^K)) / 2^K, Mod's sign that of 2^K
            y = node("Add", [node("Div", [node("Sub", [total, node("Mod", [total, step])]), step]), const(np.int32(int(zy)), "zy")])
            lo, hi = np.iinfo(zy.dtype).min, np.iinfo(zy.dtype).max
            y = node("Clip", [y, const(np.int32(lo), "lo"), const(np.int32(hi), "hi")])
            new.append(helper.make_node("Cast", [y], [q.output[0]], to=helper.np_dtype_to_tensor_dtype(zy.dtype)))
            replaced |= {id(n), id(q)}
            new_for[id(n)] = new
            continue
        elif n.op_type in ("LayerNormalization", "Softmax") and q is not None:
            y = (_exact_layer_norm if n.op_type == "LayerNormalization" else _exact_softmax)(
                n, q, operand, inits, shapes, producer, node, const)
            if y is None:
                continue
            zy = inits[q.input[2]]
            new.append(helper.make_node("Cast", [y], [q.output[0]], to=helper.np_dtype_to_tensor_dtype(zy.dtype)))
            replaced |= {id(n), id(q)}
            new_for[id(n)] = new
            continue
        else:
            continue
        if q is None:
            new.append(helper.make_node("Mul", [accf, const(np.float32(scale).reshape(shape) if np.size(scale) > 1
                                                            else np.float32(scale), "s")], [n.output[0]]))
            replaced.add(id(n))
        else:
            m = (scale / float(inits[q.input[1]])).astype(np.float32)
            y = node("Mul", [accf, const(m.reshape(shape) if m.size > 1 else m.reshape(()), "m")])
            new.append(helper.make_node("QuantizeLinear", [y, const(np.float32(1), "one"), q.input[2]], [q.output[0]]))
            replaced |= {id(n), id(q)}
        new_for[id(n)] = new
    rebuilt = []
    for n in g.node:
        rebuilt += new_for.get(id(n), [] if id(n) in replaced else [n])
    del g.node[:]
    g.node.extend(rebuilt)


def integer_products(model: onnx.ModelProto, c: dict) -> None:
    """docs/reference.md's trained products of the node and head estimators, on the oracle's model: a product
    that reads a trained int8/int16 weight W (zero point 0, its scale per tensor or per output) through its
    DequantizeLinear, and an input DequantizeLinear(q) of an 8-bit q with a constant per-tensor scale (a Conv of
    group 1, a Gemm without transA/alpha/beta, a MatMul with a 2-D weight), computes

        W_hi = ⌊W / 256⌋, W_lo = W − 256·W_hi ∈ [0, 255]
        H = Σ (q − z_x)·W_hi, L = Σ (q − z_x)·W_lo        exact integers (onnxruntime's ConvInteger/MatMulInteger)
        y = (f32(H)·256 + f32(L))·f32(f32(s_x)·f32(s_w))  (+ the product's bias input)
    and an int8 W: y = f32(H)·f32(f32(s_x)·f32(s_w)) (+ bias). Here W's planes come from a float floor."""
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    trained = {s["name"] for s in parameters(c) if s["role"] == "weight"}
    edits = _Edits(g, "ref_int")
    const, node, new = edits.const, edits.node, edits.nodes

    for n in list(g.node):
        new.append(n)
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        wdq, xdq = producer.get(n.input[1]), producer.get(n.input[0])
        if wdq is None or wdq.op_type != "DequantizeLinear" or wdq.input[0] not in trained:
            continue
        if xdq is None or xdq.op_type != "DequantizeLinear" or xdq.input[1] not in inits or inits[xdq.input[1]].size != 1 \
                or (len(xdq.input) > 2 and xdq.input[2] and xdq.input[2] not in inits):
            continue
        w = inits[wdq.input[0]]
        wzp = inits.get(wdq.input[2]) if len(wdq.input) > 2 and wdq.input[2] else None
        sw = inits.get(wdq.input[1])
        if w.dtype not in (np.int8, np.int16) or wzp is not None and np.any(wzp != 0) or sw is None:
            continue
        out_axis = {"Conv": 0, "Gemm": 0 if attrs.get("transB", 0) else 1, "MatMul": 1}[n.op_type]
        axis = next((a.i for a in wdq.attribute if a.name == "axis"), 1) % w.ndim
        if sw.size > 1 and axis != out_axis:
            continue
        if n.op_type == "Conv" and (attrs.get("group", 1) != 1 or w.ndim != 4 or attrs.get("auto_pad", b"NOTSET") not in
                                    (b"NOTSET", "NOTSET")) or n.op_type == "Gemm" and (
                attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0) \
                or n.op_type == "MatMul" and w.ndim != 2:
            continue
        new.pop()
        x_ins = [xdq.input[0]] + ([xdq.input[2]] if len(xdq.input) > 2 and xdq.input[2] else [])
        wi = wdq.input[0]
        if w.dtype == np.int16:
            hi = node("Floor", [node("Div", [node("Cast", [wi], to=onnx.TensorProto.FLOAT), const(np.float32(256), "k")])])
            hi32 = node("Cast", [hi], to=onnx.TensorProto.INT32)
            lo = node("Sub", [node("Cast", [wi], to=onnx.TensorProto.INT32), node("Mul", [hi32, const(np.int32(256), "k")])])
            planes = [(node("Cast", [hi32], to=onnx.TensorProto.INT8), ""), (node("Cast", [lo], to=onnx.TensorProto.UINT8), "")]
        else:
            planes = [(wi, "")]
        if _dtype8(x_ins[0], inits, producer) == np.uint8:
            planes = [_unsigned(edits, p) if k == 0 else (p, z) for k, (p, z) in enumerate(planes)]
        x_zero = x_ins[1:] or [""]
        if n.op_type == "Conv":
            conv = {k: v for k, v in attrs.items() if k in ("pads", "strides", "dilations", "kernel_shape")}
            sums = [node("ConvInteger", [x_ins[0], p] + x_zero + ([z] if z else []), **conv) for p, z in planes]
            shape = [-1, 1, 1]
        else:
            kn = (lambda p: node("Transpose", [p], perm=[1, 0])) if attrs.get("transB", 0) else (lambda p: p)
            sums = [node("MatMulInteger", [x_ins[0], kn(p)] + x_zero + ([z] if z else [])) for p, z in planes]
            shape = [-1]
        acc = node("Cast", [sums[0]], to=onnx.TensorProto.FLOAT)
        if len(sums) > 1:
            acc = node("Add", [node("Mul", [acc, const(np.float32(256), "k")]),
                               node("Cast", [sums[1]], to=onnx.TensorProto.FLOAT)])
        scale = np.float32(inits[xdq.input[1]]) * sw.astype(np.float32).reshape(-1)
        y = node("Mul", [acc, const(scale.reshape(shape) if scale.size > 1 else scale.reshape(()), "s")])
        if len(n.input) > 2 and n.input[2]:
            y = node("Add", [y, n.input[2] if n.op_type != "Conv" else
                             node("Reshape", [n.input[2], const(np.array(shape, np.int64), "shape")])])
        new[-1].output[0] = n.output[0]
    g.ClearField("node")
    g.node.extend(new)


def _grid_count(levels_minus_offset: np.ndarray, scale: str, bound: str, zy: np.ndarray, rank: int, node, const) -> str:
    """The largest q of z_y's grid with levels_minus_offset[q]·scale <= bound, else the grid's lowest: every
    level tried at once on a new leading axis, the true ones counted (they are a prefix: the left side
    grows with q), as int32."""
    lo = int(np.iinfo(zy.dtype).min)
    shape = [256] + [1] * (rank - 1) + [levels_minus_offset.shape[-1] if levels_minus_offset.ndim > 1 else 1]
    level = node("Mul", [node("Reshape", [const(levels_minus_offset.astype(np.float32), "levels"),
                                           const(np.array(shape, np.int64), "shape")]), scale])
    count = node("ReduceSum", [node("Cast", [node("LessOrEqual", [level, bound])], to=onnx.TensorProto.INT32),
                               const(np.array([0], np.int64), "axis0")], keepdims=0)
    return node("Max", [node("Add", [count, const(np.int32(lo - 1), "lo")]), const(np.int32(lo), "lowest")])


def _exact_layer_norm(n, q, operand, inits, shapes, producer, node, const):
    """LayerNormalization over the last axis (docs/reference.md): y = the largest q of the grid with
    (f32(q) − f32(z_y + β/s_y + ½))·sqrt(f32(D·S2 − S1²) + f32(D²ε/s_x²)) <= f32(γ/s_y)·f32(D·X − S1)."""
    x = operand(n.input[0])
    dims = shapes.get(n.input[0])
    axis = next((a.i for a in n.attribute if a.name == "axis"), -1)
    if x is None or x[1] is not None or x[2].size != 1 or not dims or not dims[-1] or axis not in (-1, len(dims) - 1) \
            or len([o for o in n.output if o]) > 1 or len(dims) > 4:
        return None
    d = dims[-1]
    if d * 255 * 255 >= 2 ** 24:
        return None

    def real(name):
        if name in inits and name not in producer:
            return inits[name].astype(np.float64)
        o = operand(name)
        return None if o is None or o[1] is None else (o[1].astype(np.float64) - o[3]) * o[2]
    gamma = real(n.input[1])
    beta = real(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros(d)
    if gamma is None or beta is None:
        return None
    xq, _, sx, zx = x
    sy, zy = float(inits[q.input[1]].reshape(())), inits[q.input[2]].reshape(())
    eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
    big_x = node("Sub", [node("Cast", [xq], to=onnx.TensorProto.INT32), const(np.int32(zx), "zx")])
    axes = const(np.array([-1], np.int64), "axes")
    s1 = node("ReduceSum", [big_x, axes], keepdims=1)
    s2 = node("ReduceSum", [node("Mul", [big_x, big_x]), axes], keepdims=1)
    var = node("Sub", [node("Mul", [s2, const(np.int32(d), "d")]), node("Mul", [s1, s1])])   # exact in int32 here
    den = node("Sqrt", [node("Add", [node("Cast", [var], to=onnx.TensorProto.FLOAT),
                                     const(np.float32(d * d * eps / float(sx) ** 2), "eps")])])
    num = node("Sub", [node("Mul", [big_x, const(np.int32(d), "d")]), s1])
    target = node("Mul", [node("Cast", [num], to=onnx.TensorProto.FLOAT), const((gamma / sy).astype(np.float32).reshape(-1), "g")])
    grid = np.arange(np.iinfo(zy.dtype).min, np.iinfo(zy.dtype).max + 1).astype(np.float32)
    levels = grid[:, None] - (int(zy) + beta / sy + 0.5).astype(np.float32).reshape(1, -1)    # float32 − float32
    return _grid_count(levels, den, target, zy, len(dims), node, const)


def _exact_softmax(n, q, operand, inits, shapes, producer, node, const):
    """Softmax over the last axis of c·DQ(q_x) (docs/reference.md): E = rint(2^k·exp(−(max q − q)·s_x·c)),
    S = ΣE, y = the largest q of the grid with (f32(q) − f32(z_y + ½))·f32(f32(S)·s_y) <= f32(E)."""
    source, c = n.input[0], 1.0
    mul = producer.get(source)
    if mul is not None and mul.op_type == "Mul":
        consts = [i for i in mul.input if i in inits and i not in producer]
        if len(consts) != 1 or inits[consts[0]].size != 1:
            return None
        source, c = next(i for i in mul.input if i != consts[0]), float(inits[consts[0]].reshape(()))
    x = operand(source)
    dims = shapes.get(n.input[0])
    axis = next((a.i for a in n.attribute if a.name == "axis"), -1)
    if x is None or x[1] is not None or x[2].size != 1 or not dims or not dims[-1] or axis not in (-1, len(dims) - 1) \
            or len(dims) > 4:
        return None
    k = min(20, int(np.floor(np.log2((2 ** 24 - 1) / dims[-1]))))
    xq, _, sx, _ = x
    sy, zy = float(inits[q.input[1]].reshape(())), inits[q.input[2]].reshape(())
    xi = node("Cast", [xq], to=onnx.TensorProto.INT32)
    gap = node("Sub", [node("ReduceMax", [xi, const(np.array([-1], np.int64), "axes")], keepdims=1), xi])
    e = node("Gather", [const(np.rint(2.0 ** k * np.exp(-np.arange(256) * float(sx) * c)).astype(np.int32), "exp"), gap])
    total = node("ReduceSum", [e, const(np.array([-1], np.int64), "axes")], keepdims=1)
    unit = node("Mul", [node("Cast", [total], to=onnx.TensorProto.FLOAT), const(np.float32(sy), "sy")])
    grid = np.arange(np.iinfo(zy.dtype).min, np.iinfo(zy.dtype).max + 1).astype(np.float32)
    return _grid_count(grid - np.float32(int(zy) + 0.5), unit, node("Cast", [e], to=onnx.TensorProto.FLOAT), zy,
                       len(dims), node, const)


def loss(logits: np.ndarray, y: np.ndarray, kind: str) -> np.float32:
    """ce, mse: y holds class indices [B]. bce: the logits are a Sigmoid's input [B, K] and y its 0/1
    labels ([B] when K = 1, else [B, K]): mean of max(z, 0) − z·y + log(1 + e^−|z|)."""
    if kind == "bce":
        z = logits.astype(np.float32)
        t = y.reshape(len(z), -1).astype(np.float32)
        return np.float32((np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))).mean())
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    if kind == "ce":
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return np.float32(-logp[np.arange(len(y)), y].mean())
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    onehot = np.eye(logits.shape[1], dtype=np.float32)[y]
    return np.float32(((p - onehot) ** 2).mean())


# ---- ce loss decisions in integers (docs/reference.md, "Loss decisions in integers") ---------------------
# Every integer below 2^24 (OpenVINO computes integer arithmetic through float32); no division but by 2^k.
LOGIT_BITS, LOSS_BITS, LOG_BITS = 10, 16, 12     # G: logits on 2^-G; F: losses on 2^-F nats; M: log mantissa bits


def _grid(z: np.ndarray):
    """(q, finite): q = rint(z·2^G) clipped to ±2^21, int64 (0 where z is not finite)."""
    z = np.asarray(z, np.float32)
    finite = np.isfinite(z)
    q = np.clip(np.rint(np.where(finite, z, 0) * np.float32(2 ** LOGIT_BITS)), -2 ** 21, 2 ** 21)
    return q.astype(np.int64), finite


def _exp_table(classes: int):
    """(T, P): T[d] = rint(2^P·exp(−d·2^-G)) for d = 0..D, the first D past which it rounds to 0; P as large
    as keeps classes·2^P below 2^24 (at most 20)."""
    p = min(20, int(np.floor(np.log2((2 ** 24 - 1) / classes))))
    d = np.arange(int(np.ceil((p + 1) * np.log(2) * 2 ** LOGIT_BITS)) + 1)
    return np.rint(2.0 ** p * np.exp(-d / 2.0 ** LOGIT_BITS)).astype(np.int64), p


def _exps(gap: np.ndarray, table: np.ndarray) -> np.ndarray:
    return table[np.minimum(gap, len(table) - 1)]


def ce_example_signs(zp: np.ndarray, zm: np.ndarray, y: np.ndarray) -> np.ndarray:
    """s_b = sign(L⁺_b − L⁻_b) of two branches' logits [B, C] for one example each, exactly: with
    r = q − q_y, L = log Σ_c exp(r_c·2^-G) up to the grid, so the sign is that of R⁺ − R⁻,
    R = Σ_c T[o − r_c] with o = max(max r⁺, max r⁻) shared by the pair; 0 where a logit is not finite."""
    table, _ = _exp_table(zp.shape[-1])
    (qp, fp), (qm, fm) = _grid(zp), _grid(zm)
    rp = qp - qp[np.arange(len(y)), y][:, None]
    rm = qm - qm[np.arange(len(y)), y][:, None]
    o = np.maximum(rp.max(-1), rm.max(-1))[:, None]
    s = np.sign(_exps(o - rp, table).sum(-1) - _exps(o - rm, table).sum(-1))
    return np.where(fp.all(-1) & fm.all(-1), s, 0)


def ce_fixed(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each example's ce loss on 2^-F nats, int64 [B] (0 where a logit is not finite):
    a·2^(F−G) + round(2^F·(e − P)·ln 2) + LT[⌊S / 2^(e−M)⌋ − 2^M], with a = min(max q − q_y, 2^16),
    S = Σ_c T[max q − q_c], e = ⌊log2 S⌋, LT[j] = rint(2^F·ln(1 + j/2^M))."""
    table, p = _exp_table(z.shape[-1])
    q, finite = _grid(z)
    gap = q.max(-1, keepdims=True) - q
    total = _exps(gap, table).sum(-1)
    e = np.floor(np.log2(total)).astype(np.int64)
    mantissa = total // 2 ** (e - min(LOG_BITS, p))
    bits = min(LOG_BITS, p)
    log_table = np.rint(2.0 ** LOSS_BITS * np.log1p(np.arange(2 ** bits) / 2.0 ** bits)).astype(np.int64)
    lg = np.rint(2.0 ** LOSS_BITS * (e - p) * np.log(2)).astype(np.int64) + log_table[mantissa - 2 ** bits]
    a = np.minimum(gap[np.arange(len(y)), y], 2 ** 16)
    return np.where(finite.all(-1), a * 2 ** (LOSS_BITS - LOGIT_BITS) + lg, 0)


def bce_fixed(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each example's bce loss (one label: z [B, 1] or [B], y 0/1 [B]) on 2^-F nats, int64 [B] (0 where z is
    not finite): (max(q, 0) − q·y)·2^(F−G) + SP[min(|q|, D)] with q clipped to ±2^16 and
    SP[j] = rint(2^F·ln(1 + exp(−j·2^-G))) up to the first D where it rounds to 0."""
    q, finite = _grid(np.asarray(z).reshape(len(y)))
    q = np.clip(q, -2 ** 16, 2 ** 16)
    j = np.arange(int(np.ceil((LOSS_BITS + 1) * np.log(2) * 2 ** LOGIT_BITS)) + 1)
    softplus = np.rint(2.0 ** LOSS_BITS * np.log1p(np.exp(-j / 2.0 ** LOGIT_BITS))).astype(np.int64)
    y = np.asarray(y, np.int64).reshape(q.shape)
    fixed = (np.maximum(q, 0) - q * y) * 2 ** (LOSS_BITS - LOGIT_BITS) + softplus[np.minimum(np.abs(q), len(j) - 1)]
    return np.where(finite, fixed, 0)


def bce_example_signs(zp: np.ndarray, zm: np.ndarray, y: np.ndarray) -> np.ndarray:
    """s_b = sign(L⁺_b − L⁻_b) for one label: the loss falls with z where y = 1 and rises where y = 0, so
    s = sign(z⁺ − z⁻)·(1 − 2y), by comparisons; 0 where a logit is not finite."""
    zp, zm = np.asarray(zp, np.float32).reshape(len(y)), np.asarray(zm, np.float32).reshape(len(y))
    s = (zp > zm).astype(np.int64) - (zp < zm).astype(np.int64)
    return np.where(np.isfinite(zp) & np.isfinite(zm), s * (1 - 2 * np.asarray(y, np.int64)), 0)


def bce_error(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """V = sigmoid(z) − y on 2^-7, int64 shaped as z, for one label: VT[clip(q, ±D) + D] − 128·y clipped to
    127, VT[j] = rint(128·σ((j − D)·2^-G)), D the first where it rounds to 0 (and 128 at +D)."""
    q, finite = _grid(np.asarray(z))
    reach = int(np.ceil(np.log(255) * 2 ** LOGIT_BITS)) + 1
    table = np.rint(128 / (1 + np.exp(-np.arange(-reach, reach + 1) / 2.0 ** LOGIT_BITS))).astype(np.int64)
    v = table[np.clip(q, -reach, reach) + reach] - 128 * np.asarray(y, np.int64).reshape(q.shape)
    return np.where(finite, np.minimum(v, 127), 0)


def branch_difference(zp: np.ndarray, zm: np.ndarray, y: np.ndarray, kind: str = "ce") -> int:
    """Σ_b (L⁺_b − L⁻_b) of ce_fixed (bce_fixed), exact in sign: each L = 2^12·hi + lo summed apart (each sum
    below 2^24 up to a batch of 4095), then d = clip(Σhi⁺ − Σhi⁻, ±2048)·2^12 + Σlo⁺ − Σlo⁻ (|d| < 2^24 for
    a batch below 2048); 0 where either branch has a logit that is not finite."""
    fixed = ce_fixed if kind == "ce" else bce_fixed
    lp, lm = fixed(zp, y), fixed(zm, y)
    if not (np.isfinite(zp).all() and np.isfinite(zm).all()):
        return 0
    hi = int(np.clip((lp // 4096).sum() - (lm // 4096).sum(), -2048, 2048))
    return hi * 4096 + int((lp % 4096).sum() - (lm % 4096).sum())


def ce_error(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """V = softmax(z) − onehot(y) on 2^-7, int64 [B, C], from integers: E = T[max q − q], S = ΣE,
    e = E − onehot·S; V is the largest v in −128..127 with (f32(v) − ½)·f32(S) <= f32(128·e), else −128
    (round half up of 128·e/S); 0 for an example with a logit that is not finite."""
    table, _ = _exp_table(z.shape[-1])
    q, finite = _grid(z)
    exps = _exps(q.max(-1, keepdims=True) - q, table)
    total = exps.sum(-1, keepdims=True)
    e = exps - np.eye(z.shape[-1], dtype=np.int64)[y] * total
    levels = np.arange(-127, 128).astype(np.float32) - np.float32(0.5)
    below = levels[:, None, None] * total.astype(np.float32)[None] <= (128 * e).astype(np.float32)[None]
    return np.where(finite.all(-1, keepdims=True), -128 + below.sum(0), 0)


def kernel_normalized(g: np.ndarray, w: np.ndarray, axis) -> np.ndarray:
    """Kernel-wise normalization (README): each kernel's ĝ scaled by (mean|W_c| / mean|W|)·(mean|ĝ| /
    mean|ĝ_c|), a gain with 8 fraction bits capped at 16, rounded half away from zero."""
    g, w = g.astype(np.int64), w.astype(np.int64)
    others = tuple(a for a in range(g.ndim) if a != axis)
    n, n_c = g.size, g.size // (g.shape[axis] if axis is not None else 1)
    a_c, b_c = np.abs(w).sum(axis=others, keepdims=True), np.abs(g).sum(axis=others, keepdims=True)
    a_mean, b_mean = a_c // n_c, (b_c * 256) // n_c
    a_all, b_all = a_c.sum() // n, (b_c.sum() * 256) // n
    gain = np.minimum((a_mean * b_all * 256) // np.maximum(a_all * b_mean, 1), 16 * 256)
    return np.sign(g) * ((np.abs(g) * gain + 128) // 256)


def sparse_keep(g: np.ndarray, u: np.ndarray, mode: str, sparsity: float) -> np.ndarray:
    """Which elements a sparse update changes (README): u holds 16 hashed bits per element."""
    g = g.astype(np.int64)
    if mode == "random":
        return u < round((1 - sparsity) * 65536)
    if mode == "threshold":
        return np.abs(g) * 256 >= np.abs(g).max() * round(256 * sparsity)
    key = np.minimum(np.abs(g), 65535) * 32768 + (u & 32767)
    k = max(1, round((1 - sparsity) * g.size))
    return key >= np.sort(key.ravel())[-k]


def parameters(c: dict) -> list[dict]:
    """The state entries that are model parameters (a momentum buffer is state, not a parameter); the
    buffer of parameter P is P + "__momentum"."""
    return [s for s in c["state"] if s["role"] != "momentum"]


def perturbations(c: dict, seed: int, step_no: int) -> dict:
    """prng: {state name: [z_0, …, z_(m−1)]}, each shaped like the tensor."""
    spec = c["spec"]
    zs = {}
    for t, s in enumerate(parameters(c)):
        zs[s["name"]] = [perturbation(seed, step_no, t, i, _numel(s), spec["perturbation"], spec["density"]).reshape(s["shape"])
                         for i in range(spec["m"])]
    return zs


def _numel(s: dict) -> int:
    return int(np.prod(s["shape"])) if s["shape"] else 1


def momentum_guided(c: dict, zs: dict, state: dict, seed: int, step_no: int) -> dict:
    """Momentum-guided sampling: where the hashed 8-bit cᵢ (stream m + 2 + i) < round(256·β) and v ≠ 0,
    zᵢ takes sign(v)."""
    spec, m = c["spec"], c["spec"]["m"]
    out = {}
    for t, s in enumerate(parameters(c)):
        direction = np.sign(state[s["name"] + "__momentum"]).astype(np.int64)
        out[s["name"]] = [np.where((chunks(seed, step_no, t, m + 2 + i, _numel(s), 8).reshape(s["shape"])
                                    < round(256 * spec["momentum"])) & (direction != 0), direction, zs[s["name"]][i])
                          for i in range(m)]
    return out


def centres(c: dict, state: dict) -> dict:
    """Where the ±εz pair is centred: W, or W̃ = clip(W + ρ·stride·sign(v)) with a sharpness-aware ascent."""
    rho = c["spec"].get("sharpness", 0)
    return {s["name"]: np.clip(state[s["name"]].astype(np.int64)
                               + rho * s["stride"] * np.sign(state.get(s["name"] + "__momentum", 0)), s["qmin"], s["qmax"])
            for s in parameters(c)}


def momentum_next(c: dict, state: dict, coef, zs: dict) -> dict:
    """v ← clip(v − trunc(v / 8) + ĝ, ±2^30) from the raw ĝ = Σ cᵢ·zᵢ."""
    new = {}
    for s in parameters(c):
        v = state[s["name"] + "__momentum"].astype(np.int64)
        g = sum(coef[i] * zs[s["name"]][i] for i in range(c["spec"]["m"]))
        new[s["name"] + "__momentum"] = np.clip(v - np.sign(v) * (np.abs(v) // 8) + g, -2 ** 30, 2 ** 30).astype(np.int32)
    return new


def integer_decisions(kind: str, logits: np.ndarray) -> bool:
    """ce over at most 2^14 classes, and bce of one label, decide in integers (branch_difference,
    ce_/bce_example_signs, ce_/bce_error)."""
    return logits.ndim == 2 and (kind == "ce" and logits.shape[-1] <= 2 ** 14 or kind == "bce" and logits.shape[-1] == 1)


def integer_coefficients(d, batch: int, spec: dict) -> np.ndarray:
    """The cᵢ from ce_branch_difference's dᵢ: sign(dᵢ), or clip(round(f32(dᵢ)·f32(gain·2^-F) / f32(B)), ±127)."""
    d = np.array(d, np.int64)
    if spec["estimator"] == "sign":
        return np.sign(d)
    gain = np.float32(spec["spsa_gain"] * 2.0 ** -LOSS_BITS)
    return np.clip(np.round(d.astype(np.float32) * gain / np.float32(batch)), -127, 127).astype(np.int64)


def coefficients(lp, lm, c: dict) -> np.ndarray:
    """estimate: the cᵢ from the branch losses (NaN and ties give 0)."""
    spec = c["spec"]
    d = np.array(lp, np.float32) - np.array(lm, np.float32)
    d = np.where(np.isnan(d), np.float32(0), d)
    scale = np.maximum(np.abs(np.array(lp, np.float32)), np.abs(np.array(lm, np.float32)))
    d = np.where(np.abs(d) <= scale * np.float32(c["tie_tolerance"]), np.float32(0), d)
    if spec["estimator"] == "sign":
        return np.sign(d).astype(np.int64)
    return np.clip(np.round(d * np.float32(spec["spsa_gain"])), -127, 127).astype(np.int64)


def gradient(c: dict, coef, zs: dict, state: dict, seed: int, step_no: int) -> dict:
    """estimate (then kernel normalization and sparsity when on): ĝ per state tensor, int64."""
    spec, m = c["spec"], c["spec"]["m"]
    grads = {}
    for t, s in enumerate(parameters(c)):
        g = sum(coef[i] * zs[s["name"]][i] for i in range(m))
        if spec.get("kernel_norm") and s["role"] == "weight" and np.dtype(s["dtype"]).kind == "i":
            g = kernel_normalized(g, state[s["name"]], s["axis"])
        if spec.get("sparsity", 0) > 0:
            u = chunks(seed, step_no, t, m + 1, _numel(s), 16).reshape(s["shape"])
            g = g * sparse_keep(g, u, spec["sparse_mode"], spec["sparsity"])
        grads[s["name"]] = g
    return grads


def update(c: dict, state: dict, grads: dict, lr: int, seed: int, step_no: int) -> dict:
    """update: W − stride·round(lr·ĝ / 2^s), saturated; lr clipped to [0, lr_max]. Node and head (ĝ has no
    static bound): ĝ saturated first to ±(2^31 − 1 − 2^s) // max(lr, 1), so lr·ĝ fits int32."""
    spec, shift = c["spec"], c["lr_numerator"]["shift"]
    lr = int(np.clip(lr, 0, c["lr_numerator"]["max"]))
    room = (2 ** 31 - 1 - (1 << shift)) // max(lr, 1)
    new = {}
    for t, s in enumerate(parameters(c)):
        g = np.asarray(grads[s["name"]], np.int64)
        tt = lr * (np.clip(g, -room, room) if spec["estimator"] in ("node", "head") else g)
        if shift == 0:
            r = tt
        else:
            if spec["rounding"] == "stochastic":
                h = (chunks(seed, step_no, t, spec["m"], _numel(s), 16) & ((1 << shift) - 1)).reshape(s["shape"])
            else:
                h = 1 << (shift - 1)
            r = np.sign(tt) * ((np.abs(tt) + h) // (1 << shift))
        if s["stride"] > 1:
            bound = (2 ** 30 - 1) // s["stride"]
            r = np.clip(r, -bound, bound) * s["stride"]
        new[s["name"]] = np.clip(state[s["name"]].astype(np.int64) - r, s["qmin"], s["qmax"]).astype(s["dtype"])
    return new


def applied(c: dict, state: dict, coef, zs: dict, seed: int, step_no: int, lr: int) -> dict:
    """The new state of a step whose coefficients are `coef` (zs: the step's, momentum-guided when on)."""
    new = update(c, state, gradient(c, coef, zs, state, seed, step_no), lr, seed, step_no)
    if len(parameters(c)) < len(c["state"]):
        new.update(momentum_next(c, state, coef, zs))
    return new


def replay(c: dict, state: dict, coef, seed: int, step_no: int, lr: int) -> dict:
    """A weight-perturbation step replayed from its coefficients alone (what a server does with a device's
    upload): the same zᵢ from (seed, step), no data, no forward."""
    zs = perturbations(c, seed, step_no)
    if c["spec"].get("momentum", 0) > 0:
        zs = momentum_guided(c, zs, state, seed, step_no)
    return applied(c, state, np.asarray(coef, np.int64), zs, seed, step_no, lr)


def step(oracle: InferenceOracle, c: dict, state: dict, x, y, seed: int, step_no: int, lr: int) -> tuple[dict, dict]:
    """One QZO-FF step (step number step_no of a run seeded `seed`): returns (new state, diagnostics
    with the losses and coefficients)."""
    assert c["stream"] == STREAM, c["stream"]
    spec = c["spec"]
    m, eps = spec["m"], spec["eps"]
    zs = perturbations(c, seed, step_no)
    if spec.get("momentum", 0) > 0:
        zs = momentum_guided(c, zs, state, seed, step_no)
    centre = centres(c, state)
    lp, lm, zp, zm = [], [], [], []
    for i in range(m):
        for sign, out, logits in ((+1, lp, zp), (-1, lm, zm)):
            w = {s["name"]: np.clip(centre[s["name"]] + sign * eps * s["stride"] * zs[s["name"]][i],
                                    s["qmin"], s["qmax"]).astype(s["dtype"]) for s in parameters(c)}
            logits.append(oracle.logits(x, w))
            out.append(loss(logits[-1], y, spec["loss"]))
    if integer_decisions(spec["loss"], zp[0]):
        coef = integer_coefficients([branch_difference(a, b_, y, spec["loss"]) for a, b_ in zip(zp, zm)], len(y), spec)
        new = applied(c, state, coef, zs, seed, step_no, lr)
        return new, {"loss_plus": np.array(lp), "loss_minus": np.array(lm), "coef": coef, "near_tie": False}
    coef = coefficients(lp, lm, c)
    new = applied(c, state, coef, zs, seed, step_no, lr)
    # |d| / (τ·max|L|): between 1/2 and 2 a runtime's few-ULP rounding can land on either side of a tie
    d = np.array(lp, np.float32) - np.array(lm, np.float32)
    scale = np.maximum(np.abs(np.array(lp, np.float32)), np.abs(np.array(lm, np.float32)))
    ratio = np.abs(d) / (scale * c["tie_tolerance"] + 1e-30)
    near = (ratio > 0.5) & (ratio < 2.0)
    if spec["estimator"] != "sign":   # gain·d within float noise of a rounding edge (k + 1/2) of cᵢ
        d = np.where(np.isnan(d), np.float32(0), d)
        d = np.where(np.abs(d) <= scale * np.float32(c["tie_tolerance"]), np.float32(0), d)
        near |= np.abs(np.abs(d * np.float32(spec["spsa_gain"])) % 1 - 0.5) < 1e-3
    return new, {"loss_plus": np.array(lp), "loss_minus": np.array(lm), "coef": coef,
                 "near_tie": bool(near.any())}


# ---- node (activity) perturbation: --estimator node --------------------------------------------------

class NodeLayer:
    """A trained Gemm/MatMul/Conv site as the node estimator sees it, read from the source model: its
    product's output (where the noise is added), the QuantizeLinear scale that reads it (the noise unit), its
    integer input q with zero point (a = q − zp) and scale, the weight layout ("kn", Gemm transB "nk", or
    "conv" [O, C, kh, kw] with its kernel, strides, pads and dilations), and its stream (the index of the
    site's first trained tensor)."""

    def __init__(self, model: onnx.ModelProto, c: dict, site: str):
        nodes = {n.name: n for n in model.graph.node}
        producer = {o: n for n in model.graph.node for o in n.output}
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        node = nodes[site]
        self.site, self.output = site, node.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.layout = "nk" if node.op_type == "Gemm" and attrs.get("transB", 0) else "kn"
        if node.op_type == "Conv":
            self.layout, self.kernel = "conv", list(inits[producer[node.input[1]].input[0]].shape[2:])
            self.strides = list(attrs.get("strides", [1, 1]))
            self.pads = list(attrs.get("pads", [0, 0, 0, 0]))
            self.dilations = list(attrs.get("dilations", [1, 1]))
            self.group = attrs.get("group", 1)
        dq = producer[node.input[0]]
        self.q = dq.input[0]
        self.in_scale = np.float32(inits[dq.input[1]])
        zp = inits[dq.input[2]] if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.uint8)
        self.zero_point, self.q_type = int(zp), helper.np_dtype_to_tensor_dtype(zp.dtype)
        quant = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == self.output)
        self.unit = np.float32(c["spec"]["eps"]) * np.float32(inits[quant.input[1]])
        params = parameters(c)
        self.stream = next(t for t, s in enumerate(params) if s["site"] == site)
        self.weight = next((s["name"] for s in params if s["site"] == site and s["role"] == "weight"), None)
        self.bias = next((s["name"] for s in params if s["site"] == site and s["role"] == "bias"), None)
        self.noise = site + "__ref_noise"
        self.input = node.input[0]
        self.whitening = next((w for w in c.get("step_whitening") or [] if w["site"] == site), None)
        self.exact = False    # node_layers: the output layer at depth


def node_layers(source: onnx.ModelProto, c: dict) -> list[NodeLayer]:
    """The trained sites' layers; with more than one and a ce or bce loss, the one that writes the logits
    (up to a requantization and a bias Add) is `exact`: no noise, its step the exact gradient (head_step's)."""
    sites = []
    for s in parameters(c):
        if s["site"] not in sites:
            sites.append(s["site"])
    layers = [NodeLayer(source, c, site) for site in sites]
    if len(layers) > 1 and c["spec"]["loss"] in ("ce", "bce"):
        for layer in layers:
            layer.exact = _writes_logits(source, layer.output, c["loss_tap"])
    return layers


def _writes_logits(model: onnx.ModelProto, name: str, tap: str) -> bool:
    """Whether the tensor `name` reaches the loss tap through QuantizeLinear, DequantizeLinear and an Add of a
    dequantized initializer only."""
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    fixed = lambda t: t in inits or t in producer and producer[t].op_type == "DequantizeLinear" and \
        all(i in inits for i in producer[t].input if i)
    while name != tap:
        readers = [n for n in model.graph.node if name in n.input]
        if len(readers) != 1 or not (readers[0].op_type in ("QuantizeLinear", "DequantizeLinear") or
                                     readers[0].op_type == "Add" and all(i == name or fixed(i) for i in readers[0].input)):
            return False
        name = readers[0].output[0]
    return True


def node_oracle(source: onnx.ModelProto, c: dict, optimized: bool = False, matrices: dict | None = None) -> InferenceOracle:
    """The inference oracle with, at each trained site, y ← y + noise (a float input [B, ...] shaped like
    the product's output) before whatever reads y, and the site's integer input q as an output (and, for a
    whitened step, its integer W and divisors d by name in `matrices`, from train.onnx)."""
    layers = node_layers(source, c)

    def edit(model, c):
        for layer in layers:    # the product writes y__ref_clean; the Add writes y, which everything reads
            at = next(k for k, n in enumerate(model.graph.node) if n.name == layer.site)
            model.graph.node[at].output[0] = layer.output + "__ref_clean"
            model.graph.node.insert(at + 1, helper.make_node("Add", [layer.output + "__ref_clean", layer.noise],
                                                             [layer.output]))
            model.graph.input.append(helper.make_tensor_value_info(layer.noise, onnx.TensorProto.FLOAT, None))
            model.graph.output.append(helper.make_tensor_value_info(layer.q, layer.q_type, None))
            if layer.whitening is not None:     # a' in integers from q (layer_gradient)
                layer.white_matrix = 256 * matrices[layer.whitening["matrix"]].astype(np.int64) + \
                    matrices[layer.whitening["low"]].astype(np.int64) + 128       # W = 256·W_hi + W_lo
                layer.white_divisors = matrices[layer.whitening["divisors"]].astype(np.int64)
            model.graph.output.append(helper.make_tensor_value_info(layer.output + "__ref_clean", onnx.TensorProto.FLOAT,
                                                                    None))
    # one thread: with more, onnxruntime's float Gemm of a few rows splits its sum over K between threads
    # (digits_cnn's fc1, K = 512: 32 rows differ in the last bit from 256 rows or one thread), which moves a
    # requantization; the training graph's tests run one thread too
    oracle = InferenceOracle(source, c, optimized=optimized, edit=edit, threads=1)
    oracle.layers = layers
    return oracle


def _position_mean(g: np.ndarray, n: int) -> np.ndarray:
    """g / n rounded half away from 0 (a Conv's ĝ over its n = H'·W' output positions)."""
    return np.sign(g) * ((np.abs(g) + n // 2) // n)


def patches(a: np.ndarray, layer: NodeLayer) -> np.ndarray:
    """im2col: rows [B·H'·W', C·kh·kw] of a [B, C, H, W] (zero outside), row (b, y, x), column (c, i, j):
    a[b, c, y·s_h + i·d_h − p_top, x·s_w + j·d_w − p_left]."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.strides, layer.dilations
    pt, pl, pb, pr = layer.pads
    B, C, H, W = a.shape
    padded = np.zeros((B, C, H + pt + pb, W + pl + pr), a.dtype)
    padded[:, :, pt:pt + H, pl:pl + W] = a
    ho, wo = (H + pt + pb - dh * (kh - 1) - 1) // sh + 1, (W + pl + pr - dw * (kw - 1) - 1) // sw + 1
    out = np.empty((B, ho, wo, C, kh, kw), a.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, :, :, :, i, j] = padded[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh,
                                           j * dw:j * dw + sw * (wo - 1) + 1:sw].transpose(0, 2, 3, 1)
    return out.reshape(B * ho * wo, C * kh * kw)


_ORT_OPS = {}


def _ort_op(op: str, z: np.ndarray) -> np.ndarray:
    """onnxruntime's LogSoftmax, Softmax or Sigmoid of z over its last axis: numpy's exp rounds differently
    in the last bit, and a step that reads these through a sign or a rounding would flip on it."""
    if op not in _ORT_OPS:
        attrs = {} if op == "Sigmoid" else {"axis": -1}
        graph = helper.make_graph([helper.make_node(op, ["z"], ["p"], **attrs)], op,
                                  [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)],
                                  [helper.make_tensor_value_info("p", onnx.TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        _ORT_OPS[op] = ort.InferenceSession(model.SerializeToString(), unfused(), providers=["CPUExecutionProvider"])
    return _ORT_OPS[op].run(["p"], {"z": np.ascontiguousarray(z, np.float32)})[0]


def per_example_loss(logits: np.ndarray, y: np.ndarray, kind: str) -> np.ndarray:
    """float32 [B]: each example's loss (its mean over classes or labels where `loss` takes one). ce takes
    its log-softmax from onnxruntime's LogSoftmax: a confident example's loss (~1e-6) is a log-sum-exp near
    log 1, where numpy's and onnxruntime's roundings differ by ~2^-23, so two branches' losses could order
    differently and one sign flip; the logits themselves come from the oracle either way."""
    if kind != "ce":
        return np.array([loss(logits[b:b + 1], y[b:b + 1], kind) for b in range(len(logits))], np.float32)
    logp = _ort_op("LogSoftmax", logits)
    return -logp[np.arange(len(y)), y]


def node_step(oracle: InferenceOracle, c: dict, state: dict, x, y, seed: int, step_no: int, lr: int):
    """One node-perturbation step (README: --estimator node), from the formulas alone:
        u_{i,b}  = ±1 of the layer's output per example: stream i of the layer, element b·n + j (schedule
                   alternate: 0 unless i mod L is the layer's place among the L trained layers)
        L±_{i,b} = the loss of example b with every trained layer's output y ± ε·unit·u_{i,b}
        s_{i,b}  = ce_example_signs (ce), else sign(L⁺ − L⁻) (0 where |L⁺ − L⁻| <= τ·max(|L⁺|, |L⁻|, 1));
        V_b      = Σ_i s_{i,b}·u_{i,b}
        V_b ← V_b − round(mean_j V_b,j) (half away from 0, clipped to ±127) where the layer's output is the
              logits that the ce loss reads (the loss tap),
        the layer that writes the logits, where more than one layer trains (node_layers: `exact`): no noise,
              and its ĝ is exact_gradient's, from the clean logits,
        where the loss is bce of one logit (a detector), at any depth: V_b ← round_half_away(V_b·|V*_b| / (2m))
              with V*_b = logit_error of the clean logit (e_b on 2^-7): the loss difference of one logit is e_b
              times that of the logit, so the sign keeps the logit's direction and |e_b| restores how much
              example b's loss asks (|V| <= 64),
        ĝ_W = Σ_b a_b ⊗ V_b (a = q − zp, the clean integer input; rows of tokens summed too; a whitened step
              takes a = QuantizeLinear(a_float·P², s) instead), ĝ_bias = Σ_b V_b,
        for a Conv the rows are its output positions (b, y, x) and a_b its im2col patches (`patches`):
              ĝ_W[o, c, i, j] = Σ_{b,y,x} V[b, o, y, x]·a[b, c, y·s + i·d − p, x·s + j·d − p] (zero outside),
              grouped (G groups): output o reads the input channels of its group, k·C/G + c for o in group k,
              whitened: a = QuantizeLinear(patches((q − zp)·scale)·P², s),
              then ĝ_W and ĝ_bias ← round_half_away(ĝ / (H'·W')), a mean over the output positions,
        each saturated to ±NODE_GRAD_MAX, then the integer update."""
    spec, m, layers = c["spec"], c["spec"]["m"], oracle.layers
    weights = {s["name"]: state[s["name"]] for s in parameters(c)}
    B = len(y)
    names = [oracle.tap] + [k for layer in layers for k in (layer.q, layer.output + "__ref_clean")]

    def run(noise):
        feeds = {**(x if isinstance(x, dict) else {oracle.data: x}), **weights, **noise}
        return dict(zip(names, oracle.sess.run(names, feeds)))
    clean = run({layer.noise: np.zeros(1, np.float32) for layer in layers})
    shapes = {layer.site: clean[layer.output + "__ref_clean"].shape for layer in layers}
    u = {layer.site: [perturbation(seed, step_no, layer.stream, i, int(np.prod(shapes[layer.site])), "rademacher", 1.0)
                      .reshape(shapes[layer.site]) if not layer.exact else np.zeros(shapes[layer.site], np.int64)
                      for i in range(m)] for layer in layers}
    perturbed = [layer for layer in layers if not layer.exact]
    if spec.get("node_schedule", "all") == "alternate":     # direction i perturbs layer i mod L only
        for k, layer in enumerate(perturbed):
            u[layer.site] = [ui if i % len(perturbed) == k else 0 * ui for i, ui in enumerate(u[layer.site])]
    lp, lm = np.zeros((m, B), np.float32), np.zeros((m, B), np.float32)
    s = np.zeros((m, B), np.int64)
    integer = integer_decisions(spec["loss"], clean[oracle.tap])
    for i in range(m):
        z = {}
        for sign, out in ((1, lp), (-1, lm)):
            noise = {layer.noise: (sign * u[layer.site][i]).astype(np.float32) * layer.unit for layer in layers}
            z[sign] = run(noise)[oracle.tap]
            out[i] = per_example_loss(z[sign], y, spec["loss"])
        if integer:
            s[i] = (ce_example_signs if spec["loss"] == "ce" else bce_example_signs)(z[1], z[-1], y)
    d = lp - lm
    d = np.where(np.isnan(d), np.float32(0), d)
    scale = np.maximum(np.maximum(np.abs(lp), np.abs(lm)), np.float32(1))     # a tie relative to at least 1
    if not integer:
        tie = np.abs(d) <= scale * np.float32(c["tie_tolerance"])
        s = np.sign(np.where(tie, np.float32(0), d)).astype(np.int64)
    grads, z = {}, clean[oracle.tap]
    weight = np.abs(logit_error(z, y, "bce")).reshape(B) if spec["loss"] == "bce" and z.shape[-1] == 1 else None
    for layer in layers:
        if layer.exact:
            grads.update(exact_gradient(layer, clean, z, y, spec["loss"], state)[1])
    for layer in layers:
        if layer.exact:
            continue
        v = sum(s[i].reshape((B,) + (1,) * (len(shapes[layer.site]) - 1)) * u[layer.site][i] for i in range(m))
        if weight is not None:
            v = _position_mean(v * weight.reshape((B,) + (1,) * (v.ndim - 1)), 2 * m)
        positions = int(np.prod(v.shape[2:])) if layer.layout == "conv" else 1   # H'·W'
        if layer.layout == "conv":                                  # rows: the output positions (b, y, x)
            v = v.transpose(0, 2, 3, 1)
        v = v.reshape(-1, v.shape[-1])                                                   # [rows, out]
        if layer.output == oracle.tap and spec["loss"] == "ce":     # ce cannot see a shift of every logit
            n, total = v.shape[-1], v.sum(axis=1, keepdims=True)
            v = np.clip(v - np.sign(total) * ((np.abs(total) + n // 2) // n), -127, 127)
        grads.update(layer_gradient(layer, clean, v, state, positions))
    new = update(c, state, grads, lr, seed, step_no)
    ratio = np.abs(d) / (scale * c["tie_tolerance"] + 1e-30)
    return new, {"loss_plus": lp.mean(axis=1), "loss_minus": lm.mean(axis=1), "coef": s,
                 "near_tie": not integer and bool(((ratio > 0.5) & (ratio < 2.0)).any())}


def layer_gradient(layer: NodeLayer, clean: dict, v: np.ndarray, state: dict, positions: int) -> dict:
    """ĝ_W = Σ_rows a ⊗ V and ĝ_bias = Σ_rows V of one layer from its output signal V [rows, out] (node_step's
    formulas: a from the clean run's q, or its whitened a'; a Conv's im2col patches and groups, its mean over
    the `positions`), each saturated to ±NODE_GRAD_MAX."""
    grads = {}
    a = clean[layer.q].astype(np.int64) - layer.zero_point
    if layer.layout == "conv":
        a = patches(a, layer)                                                        # [rows, C·kh·kw]
    a = a.reshape(-1, a.shape[-1])                                                   # [rows, in]
    if layer.whitening is not None:     # a'_j = clip(⌊(Σ_i a_i·W_ij + d_j/2) / d_j⌋, −128, 127)
        w, d = layer.white_matrix, layer.white_divisors
        taps = a.reshape(len(a), w.shape[0], -1)                                     # a Conv: each tap's channels
        white = np.einsum("rct,cj->rjt", taps, w)
        a = np.clip((white + (d // 2)[:, None]) // d[:, None], -128, 127).reshape(len(a), -1)
    if layer.weight and layer.layout == "conv":   # group k: its O/G outputs, its C/G input channels' patches
        G = layer.group
        cols, outs = a.shape[1] // G, v.shape[1] // G
        g = np.concatenate([(a[:, k * cols:(k + 1) * cols].T @ v[:, k * outs:(k + 1) * outs]).T for k in range(G)])
        grads[layer.weight] = np.clip(_position_mean(g.reshape(state[layer.weight].shape), positions),
                                      -NODE_GRAD_MAX, NODE_GRAD_MAX)
    elif layer.weight:
        g = a.T @ v                                                                  # [in, out]
        g = g.T if layer.layout == "nk" else g
        grads[layer.weight] = np.clip(g, -NODE_GRAD_MAX, NODE_GRAD_MAX)
    if layer.bias:
        grads[layer.bias] = np.clip(_position_mean(v.sum(axis=0), positions), -NODE_GRAD_MAX, NODE_GRAD_MAX)
    return grads


# ---- the head's exact gradient: --estimator head ------------------------------------------------------

def head_step(oracle: InferenceOracle, c: dict, state: dict, x, y, seed: int, step_no: int, lr: int):
    """One head step (README: --estimator head), from the formulas alone, on node_oracle's one layer (the
    trained output layer) without noise:
        e_b = softmax(z_b) − onehot(y_b) (ce) or sigmoid(z_b) − y_b (bce), z_b the clean logits
        V_b = ce_error(z, y) or bce_error(z, y) (integers; bce of one label), else clip(round_half_even(128·e_b), −128, 127)
        ĝ_W = Σ_b a_b ⊗ V_b, ĝ_bias = Σ_b V_b               (layer_gradient: a, its whitening, saturation)
        ĝ ← round_half_away(ĝ / 16)
    then the integer update; loss_plus = loss_minus = the clean batch loss."""
    spec, layer = c["spec"], oracle.layers[0]
    weights = {s["name"]: state[s["name"]] for s in parameters(c)}
    names = [oracle.tap, layer.q]
    feeds = {**(x if isinstance(x, dict) else {oracle.data: x}), **weights, layer.noise: np.zeros(1, np.float32)}
    clean = dict(zip(names, oracle.sess.run(names, feeds)))
    z = clean[oracle.tap]
    v, grads = exact_gradient(layer, clean, z, y, spec["loss"], state)
    new = update(c, state, grads, lr, seed, step_no)
    batch = np.float32(loss(z, y, spec["loss"]))
    return new, {"loss_plus": np.array([batch]), "loss_minus": np.array([batch]), "coef": v}


def exact_gradient(layer: NodeLayer, clean: dict, z: np.ndarray, y, kind: str, state: dict):
    """(V, ĝ) of the layer that writes the logits z (head_step's formulas): V = logit_error(z, y, kind);
    ĝ = round_half_away(layer_gradient / 16)."""
    v = logit_error(z, y, kind)
    grads = layer_gradient(layer, clean, v.reshape(-1, v.shape[-1]), state, 1)
    return v, {k: _position_mean(g, 16) for k, g in grads.items()}


def logit_error(z: np.ndarray, y, kind: str) -> np.ndarray:
    """V of the logits z: ce_error(z, y) (ce) or bce_error(z, y) (bce, one label), else
    clip(round_half_even(128·e), −128, 127) for e = softmax(z) − onehot(y) or sigmoid(z) − y."""
    if integer_decisions(kind, z):
        return (ce_error if kind == "ce" else bce_error)(z, y)
    if kind == "ce":
        e = _ort_op("Softmax", z) - np.eye(z.shape[-1], dtype=np.float32)[y]
    else:
        e = _ort_op("Sigmoid", z) - np.asarray(y, np.float32).reshape(z.shape)
    return np.clip(np.rint(e * np.float32(128)), -128, 127).astype(np.int64)


NODE_GRAD_MAX = 2 ** 20   # README: |ĝ| saturates there (binds only past m·rows·255 > 2^20)
