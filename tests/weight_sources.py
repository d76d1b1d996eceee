"""Test models whose weights reach their products the ways exporters other than quantize_static write them.

as_constants(model)  every initializer becomes a Constant node (named as the initializer was), and the
                     QuantizeLinear/DequantizeLinear nodes read each distinct zero point from ONE shared
                     source, the first directly and the others through an Identity each, as TorchScript's
                     fake-quant export does (constants=False keeps the initializers)
fake_quant(model)    (models/recipes/build_dialects.py) float weights → QuantizeLinear → DequantizeLinear
stft_frontend()      a waveform model whose first layer is a fixed basis: a Conv with a 258x1x256 kernel and
                     no bias, as an STFT written as a Conv looks
"""
from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import MODELS
from qdq_graphs import Chain, _model

sys.path.insert(0, str(MODELS / "recipes"))
from build_dialects import fake_quant  # noqa: E402,F401

PRODUCTS = ("Conv", "Gemm", "MatMul")


def as_constants(model: onnx.ModelProto, constants: bool = True) -> onnx.ModelProto:
    """TorchScript's fake-quant shape: each distinct zero point is stored once; its first reader reads it,
    every later one through an Identity of it. With `constants`, every initializer is a Constant node."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    sources, identities = {}, []
    for node in g.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2] in inits:
            a = inits[node.input[2]]
            key = (a.dtype.str, a.shape, a.tobytes())
            if key not in sources:
                sources[key] = node.input[2]
                continue
            read = f"{sources[key]}__identity_{len(identities)}"
            identities.append(helper.make_node("Identity", [sources[key]], [read], name=f"Identity_{len(identities)}"))
            node.input[2] = read
    used = {i for n in list(g.node) + identities for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    constants = [helper.make_node("Constant", [], [i.name], name=f"Constant_{i.name}", value=i) for i in keep] \
        if constants else []
    nodes = constants + identities + list(g.node)
    del g.node[:], g.initializer[:]
    g.node.extend(nodes)
    if not constants:
        g.initializer.extend(keep)
    onnx.checker.check_model(out)
    return out


def products(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in PRODUCTS]


def stft_frontend(samples: int = 1024, bins: int = 258, taps: int = 256, hop: int = 128, classes: int = 4,
                  seed: int = 0) -> onnx.ModelProto:
    """wave [B, 1, samples] → Q/DQ → Conv(basis [bins, 1, taps], stride hop, no bias) → Abs → Q/DQ → Conv 1x1
    (with bias) → ReduceMean over time → Q/DQ → Gemm → logits [B, classes]."""
    c = Chain(np.random.default_rng(seed))
    h = c.qdq("wave", 1 / 64)
    basis, _ = c.weight((bins, 1, taps), np.int8, True, 0)
    h = c.qdq(c.op("Abs", [c.op("Conv", [h, basis], strides=[hop])]), 1 / 16)
    w, ws = c.weight((8, bins, 1), np.int8, True, 0)
    h = c.qdq(c.op("Relu", [c.op("Conv", [h, w, c.bias(8, 1 / 16, ws)])]), 1 / 16)
    h = c.qdq(c.op("ReduceMean", [h, c.init("time", np.array([2]))], keepdims=0), 1 / 16)
    w, ws = c.weight((classes, 8), np.int8, True, 0)
    h = c.qdq(c.op("Gemm", [h, w, c.bias(classes, 1 / 16, ws)], transB=1), 1 / 16)
    return _model(c, "wave", ["batch", 1, samples], h, ["batch", classes])


def float16_weight() -> onnx.ModelProto:
    """A Gemm whose float16 weight goes through QuantizeLinear (a float16 export's fake-quant): no exact fold."""
    w = np.linspace(-1, 1, 12, dtype=np.float16).reshape(4, 3)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(0.01, np.float16), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["W", "s", "zp"], ["Wq"], name="qw"),
             helper.make_node("DequantizeLinear", ["Wq", "s", "zp"], ["Wd"], name="dqw"),
             helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16, name="cast_in"),
             helper.make_node("Gemm", ["xh", "Wd"], ["h"], name="gemm", transB=1),
             helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT, name="cast_out")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m
