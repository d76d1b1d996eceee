"""Parameter kinds beyond Conv/Gemm/MatMul weights: Add biases after MatMul (quantized or float),
LayerNormalization and BatchNormalization scale/bias (quantized or float, the float ones on
passes/floatgrid.py's int32 grid). Each steps bit for bit with the numpy reference."""
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import qdq_graphs
from conftest import MODELS, shipped
from fgcompile.passes import floatgrid
from fgcompile.passes.pipeline import compile_graph
from fgcompile.session import make_session
from fgcompile.spec import TrainSpec
from test_step_matches_reference import run_chain

sys.path.insert(0, str(MODELS / "recipes"))
import build_dialects  # noqa: E402


def roles(compiled):
    return {s.name: (s.role, s.dtype, s.float_grid) for s in compiled.contract.state}


@pytest.mark.parametrize("bits", [8, 16])
def test_quantized_layernorm_and_add_bias_match_reference(bits, target_train):
    spec = TrainSpec(train=("ln2", "head"), m=2, bits=bits)
    r = roles(compile_graph(shipped("digits_attn/w8a8.onnx"), spec))
    assert r["ln2.weight_quantized"][0] == "scale" and r["ln2.bias_quantized"][0] == "bias"
    assert r["head.bias_quantized"][1] == ("uint16" if bits == 16 else "uint8")
    run_chain("digits_attn/w8a8.onnx", spec, target_train, steps=4)


@pytest.fixture(scope="module")
def dynamic_attn():
    return build_dialects.build("digits_attn", "dynamic")


@pytest.mark.parametrize("train", [(), ("ln1",)])
def test_float_layernorm_and_add_bias_match_reference(dynamic_attn, train, target_train):
    """quantize_dynamic leaves LayerNormalization and the MatMul biases float: they train on floatgrid."""
    spec = TrainSpec(train=train, m=2)
    r = roles(compile_graph(dynamic_attn, spec))
    gridded = [n for n, (_, dtype, grid) in r.items() if grid is not None]
    assert gridded == (["head.bias"] if not train else ["ln1.weight", "ln1.bias"])
    run_chain(dynamic_attn, spec, target_train, steps=4)


def test_float_batchnorm_matches_reference(target_train):
    model = qdq_graphs.conv_bn_chain(4)
    spec = TrainSpec(train=("batchnormalization",), m=2)
    r = roles(compile_graph(model, spec))
    assert [v[0] for v in r.values()] == ["scale", "bias"] and all(v[2] for v in r.values())
    run_chain(model, spec, target_train, steps=4)


@pytest.mark.parametrize("magnitude", [1e-3, 0.7, 1.0, 3.0, 250.0])
def test_float_grid_is_exact_in_the_top_octaves(magnitude):
    """s = 2^(⌈log2 max|P|⌉ − 27): elements within 2^4 of the largest are exact, others move ≤ s/2."""
    rng = np.random.default_rng(7)
    p = (rng.normal(0, magnitude, 4096) * rng.choice([1, 1e-3, 1e-6], 4096)).astype(np.float32)
    p[0] = magnitude
    s = floatgrid.grid_scale(p)
    e = np.ceil(np.log2(np.abs(p).max()))
    assert s == np.float32(2.0 ** (e - 27))
    q = floatgrid.on_grid(p, s)
    assert np.abs(q).max() <= 2 ** 27
    g = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "s"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.asarray(s), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    y = make_session(m).run(None, {})[0]
    top = np.abs(p) >= 2.0 ** (e - 4)
    np.testing.assert_array_equal(y[top], p[top])
    assert np.abs(y.astype(np.float64) - p).max() <= float(s) / 2
    assert (~top).any() and top.sum() > 1
