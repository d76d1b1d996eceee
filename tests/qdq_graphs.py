"""Small hand-built QDQ graphs for tests: random chains of Conv/Gemm/MatMul(+Add bias)/Relu.

Each layer: W (int8 or int16, per-tensor or per-channel, zero point 0) -> DequantizeLinear -> op, then
the activation goes through QuantizeLinear -> DequantizeLinear (uint8), as quantize_static emits it.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Chain:
    def __init__(self, rng: np.random.Generator):
        self.rng, self.nodes, self.inits, self.k = rng, [], [], 0

    def name(self, hint):
        self.k += 1
        return f"{hint}{self.k}"

    def init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def qdq(self, x, scale, zero_point=0):
        s, zp = self.init(self.name("as"), np.float32(scale)), self.init(self.name("azp"), np.uint8(zero_point))
        q = self.name("q")
        self.nodes.append(helper.make_node("QuantizeLinear", [x, s, zp], [q], name=q))
        d = self.name("d")
        self.nodes.append(helper.make_node("DequantizeLinear", [q, s, zp], [d], name=d))
        return d

    def weight(self, shape, dtype, per_channel, axis):
        info = np.iinfo(dtype)
        lim = min(info.max, 100 if dtype == np.int8 else 20000)
        w = self.rng.integers(-lim, lim + 1, size=shape).astype(dtype)
        n = shape[axis] if per_channel else 1
        fan_in = int(np.prod(shape)) // shape[axis]
        scale = (self.rng.uniform(0.5, 1.5, n) / (lim * np.sqrt(fan_in))).astype(np.float32)
        wn = self.name("W")
        self.init(wn, w)
        s = self.init(self.name("ws"), scale if per_channel else scale[0])
        zp = self.init(self.name("wzp"), np.zeros(n, dtype) if per_channel else dtype(0))
        out = self.name("wd")
        attrs = {"axis": axis} if per_channel else {}
        self.nodes.append(helper.make_node("DequantizeLinear", [wn, s, zp], [out], name=self.name("dqw"), **attrs))
        return out, scale

    def bias(self, n, in_scale, w_scale):
        b = self.rng.integers(-200, 200, size=n).astype(np.int32)
        bs = (np.float32(in_scale) * np.broadcast_to(w_scale, (n,))).astype(np.float32)
        bn = self.name("B")
        self.init(bn, b)
        out = self.name("bd")
        self.nodes.append(helper.make_node("DequantizeLinear", [bn, self.init(self.name("bs"), bs),
                                                                self.init(self.name("bzp"), np.zeros(n, np.int32))],
                                           [out], name=self.name("dqb"), axis=0))
        return out

    def op(self, op_type, inputs, **attrs):
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def dense_chain(seed: int, widths=(6, 8, 5), ops=("Gemm", "MatMul"), dtype=np.int8, per_channel=True,
                relu=True, batch="batch", sigmoid=False) -> onnx.ModelProto:
    """x [B, widths[0]] -> (Gemm | MatMul+Add) per layer -> logits [B, widths[-1]]. sigmoid: a detector
    (widths[-1] = 1) or multi-label head as quantize_static leaves it: the logits on a signed grid (zero
    point 128), then Sigmoid -> Q/DQ (scale 1/256) -> probabilities [B, widths[-1]]."""
    c = Chain(np.random.default_rng(seed))
    h = c.qdq("x", 1 / 64)
    act = 1 / 64
    for i, (fin, fout) in enumerate(zip(widths[:-1], widths[1:])):
        op = ops[i % len(ops)]
        last = i == len(widths) - 2
        if op == "Gemm":
            w, ws = c.weight((fout, fin), dtype, per_channel, 0)
            h = c.op("Gemm", [h, w, c.bias(fout, act, ws)], transB=1)
        else:
            w, ws = c.weight((fin, fout), dtype, per_channel, 1)
            h = c.op("Add", [c.op("MatMul", [h, w]), c.bias(fout, act, ws)])
        if relu and not last:
            h = c.op("Relu", [h])
        h = c.qdq(h, 1 / 16, 128 if sigmoid and last else 0)
        act = 1 / 16
    if sigmoid:
        h = c.qdq(c.op("Sigmoid", [h]), 1 / 256)
    return _model(c, "x", [batch, widths[0]], h, [batch, widths[-1]])


def conv_chain(seed: int, channels=(1, 4, 3), hw=5, classes=4, dtype=np.int8, per_channel=True) -> onnx.ModelProto:
    """x [B, C, H, W] -> (Conv 3x3 same + Relu)* -> Flatten -> Gemm -> logits [B, classes]."""
    c = Chain(np.random.default_rng(seed))
    h = c.qdq("x", 1 / 64)
    act = 1 / 64
    for cin, cout in zip(channels[:-1], channels[1:]):
        w, ws = c.weight((cout, cin, 3, 3), dtype, per_channel, 0)
        h = c.qdq(c.op("Relu", [c.op("Conv", [h, w, c.bias(cout, act, ws)], pads=[1, 1, 1, 1])]), 1 / 16)
        act = 1 / 16
    h = c.qdq(c.op("Flatten", [h], axis=1), 1 / 16)
    w, ws = c.weight((classes, channels[-1] * hw * hw), dtype, per_channel, 0)
    h = c.qdq(c.op("Gemm", [h, w, c.bias(classes, act, ws)], transB=1), 1 / 16)
    return _model(c, "x", ["batch", channels[0], hw, hw], h, ["batch", classes])


def _model(c: Chain, x, x_shape, out, out_shape) -> onnx.ModelProto:
    g = helper.make_graph(c.nodes, "chain", [helper.make_tensor_value_info(x, TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], c.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], producer_name="fgcompile-tests")
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    return m


def qdq_model(consumer="Gemm", extra_after=None, tie=False, float_residual=False):
    """x -> Q/DQ -> consumer(DQ(W)) [-> extra_after] -> y; float_residual adds sum(x) to y unquantized,
    a float path by which a NaN input reaches the loss."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.int8).reshape(4, 3) - 6, "W")
    inits = [w, numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "zp"),
             numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.uint8), "xzp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"], name="qx"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xzp"], ["xd"], name="dqx"),
             helper.make_node("DequantizeLinear", ["W", "s", "zp"], ["Wd"], name="dqw")]
    if consumer == "Gemm":
        nodes.append(helper.make_node("Gemm", ["xd", "Wd"], ["h"], name="gemm", transB=1))
    else:
        nodes.append(helper.make_node(consumer, ["xd", "Wd"], ["h"], name="mm"))
    out = "h"
    if tie:
        nodes.append(helper.make_node("DequantizeLinear", ["W", "s", "zp"], ["Wd2"], name="dqw2"))
        nodes.append(helper.make_node("Gemm", ["h", "Wd2"], ["h2"], name="gemm2", transA=1))
        out = "h2"
    if extra_after:
        nodes.append(helper.make_node(extra_after, [out], ["y"], name="bad_node"))
        out = "y"
    if float_residual:
        nodes.append(helper.make_node("ReduceSum", ["x"], ["xs_sum"], name="xsum", keepdims=1))
        nodes.append(helper.make_node("Add", [out, "xs_sum"], ["yr"], name="residual"))
        out = "yr"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["b", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def conv_bn_chain(seed: int, channels=(1, 3), hw=8, classes=10) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv -> BatchNormalization (float scale/bias/mean/var, not folded) -> Relu -> Q/DQ ->
    Flatten -> Gemm -> logits."""
    c = Chain(np.random.default_rng(seed))
    h = c.qdq("x", 1 / 64)
    cin, cout = channels
    w, ws = c.weight((cout, cin, 3, 3), np.int8, True, 0)
    h = c.op("Conv", [h, w, c.bias(cout, 1 / 64, ws)], pads=[1, 1, 1, 1])
    rng = c.rng
    bn = [c.init(c.name(k), v.astype(np.float32)) for k, v in (
        ("gamma", rng.uniform(0.5, 1.5, cout)), ("beta", rng.normal(0, 0.2, cout)),
        ("mean", rng.normal(0, 0.1, cout)), ("var", rng.uniform(0.5, 2, cout)))]
    h = c.qdq(c.op("Relu", [c.op("BatchNormalization", [h] + bn)]), 1 / 16)
    h = c.qdq(c.op("Flatten", [h], axis=1), 1 / 16)
    w, ws = c.weight((classes, cout * hw * hw), np.int8, True, 0)
    h = c.qdq(c.op("Gemm", [h, w, c.bias(classes, 1 / 16, ws)], transB=1), 1 / 16)
    return _model(c, "x", ["batch", cin, hw, hw], h, ["batch", classes])


def token_id_model(seed: int = 0, vocab: int = 20, tokens: int = 4, classes: int = 5) -> onnx.ModelProto:
    """ids int64 [B, T] -> Gather(float embedding) -> ReduceMean over T -> Q/DQ -> MatMul(DQ(W)) + Add(DQ(b))
    -> Q/DQ -> logits: a model whose data input is integer token ids."""
    c = Chain(np.random.default_rng(seed))
    c.init("emb", np.random.default_rng(seed + 1).normal(size=(vocab, 6)).astype(np.float32))
    g = c.op("ReduceMean", [c.op("Gather", ["emb", "ids"]), c.init("ax", np.array([1]))], keepdims=0)
    w, ws = c.weight((6, classes), np.int8, True, 1)
    h = c.qdq(c.op("Add", [c.op("MatMul", [c.qdq(g, 1 / 64), w]), c.bias(classes, 1 / 64, ws)]), 1 / 16)
    graph = helper.make_graph(c.nodes, "t", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", tokens])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["batch", classes])], c.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def two_input_model(seed: int = 0, vocab: int = 20, classes: int = 5) -> onnx.ModelProto:
    """An image-plus-metadata style model: x float [B, 4] and ids int64 [B, 3] (embedded, averaged) ->
    Concat -> Q/DQ -> MatMul(DQ(W)) + Add(DQ(b)) -> Q/DQ -> logits."""
    c = Chain(np.random.default_rng(seed))
    c.init("emb", np.random.default_rng(seed + 1).normal(size=(vocab, 2)).astype(np.float32))
    e = c.op("ReduceMean", [c.op("Gather", ["emb", "ids"]), c.init("ax", np.array([1]))], keepdims=0)
    h = c.qdq(c.op("Concat", ["x", e], axis=1), 1 / 64)
    w, ws = c.weight((6, classes), np.int8, True, 1)
    h = c.qdq(c.op("Add", [c.op("MatMul", [h, w]), c.bias(classes, 1 / 64, ws)]), 1 / 16)
    graph = helper.make_graph(c.nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
                                               helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["batch", classes])], c.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model
