"""Import dialects (passes/canonicalize.py): each exporter's model is rewritten into QDQ weight sites that
compute the same function, then compiles, steps bit-exactly with the numpy reference, and exports."""
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import MODELS
from fgcompile.errors import CompileError
from fgcompile.passes import canonicalize
from fgcompile.passes.dialects import fakequant
from fgcompile.passes.pipeline import compile_graph
from fgcompile.session import make_session
from fgcompile.spec import TrainSpec
from test_step_matches_reference import run_chain

sys.path.insert(0, str(MODELS / "recipes"))
import build_dialects  # noqa: E402

CASES = [(a, d) for a in build_dialects.ARCHS for d in build_dialects.DIALECTS]


@pytest.fixture(scope="module")
def corpus():
    cache = {}

    def get(arch, dialect):
        if (arch, dialect) not in cache:
            cache[arch, dialect] = build_dialects.build(arch, dialect)
        return cache[arch, dialect]
    return get


def outputs(model, x):
    return make_session(model).run(None, {"x": x})[0]


@pytest.mark.parametrize("arch,dialect", CASES)
def test_canonical_model_computes_the_same_function(corpus, arch, dialect):
    """Bit-identical in onnxruntime (default optimizations, which fuse DQ→op→Q into the QLinear kernels
    the QOperator source names) on random inputs, including values outside the calibration range."""
    source = corpus(arch, dialect)
    canonical, notes = canonicalize.canonical(source)
    if not dialect.startswith("qdq"):
        assert notes, "nothing was rewritten: the comparison below would be vacuous"
    onnx.checker.check_model(canonical, full_check=True)
    x = np.random.default_rng(0).uniform(-0.5, 1.5, (64, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(outputs(canonical, x), outputs(source, x))
    assert len({n.name for n in canonical.graph.node}) == len(canonical.graph.node)


@pytest.mark.parametrize("arch,dialect", CASES)
def test_dialect_steps_match_reference(corpus, arch, dialect, target_train):
    run_chain(corpus(arch, dialect), TrainSpec(m=2, last=2, estimator="sign"), target_train, steps=3)


@pytest.mark.parametrize("dialect", ["qoperator", "dynamic", "int4"])
def test_dialect_trains_at_8_bits(corpus, dialect, target_train):
    run_chain(corpus("digits_cnn", dialect), TrainSpec(m=2, bits=8), target_train, steps=3)


@pytest.mark.parametrize("dtype,axis", [(np.int8, None), (np.uint8, None), (np.int8, 0), (np.uint8, 1)])
def test_fold_equals_onnxruntime_quantize_linear(dtype, axis):
    """Ties (k + 0.5)·s round half to even; values beyond the range saturate; as QuantizeLinear does."""
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.01, 0.1, 6 if axis is not None else ()).astype(np.float32)
    zp = rng.integers(-3, 4, scale.shape).astype(dtype) if dtype == np.int8 else rng.integers(100, 150, scale.shape).astype(dtype)
    shape = (6, 6)
    bshape = [1, 1]
    if axis is not None:
        bshape[axis] = 6
    s = scale.reshape(bshape if axis is not None else ())
    halves = (rng.integers(-300, 300, shape) + 0.5).astype(np.float32) * s
    w = np.concatenate([halves, rng.normal(0, 5, shape).astype(np.float32)], axis=1 - (axis or 0))
    if axis == 1:
        w = np.concatenate([halves, rng.normal(0, 5, shape).astype(np.float32)], axis=0)
    node = helper.make_node("QuantizeLinear", ["w", "s", "zp"], ["q"], **({"axis": axis} if axis is not None else {}))
    g = helper.make_graph([node], "q", [], [helper.make_tensor_value_info("q", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None)],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "s"),
                           numpy_helper.from_array(zp, "zp")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    want = make_session(m).run(None, {})[0]
    got = fakequant.quantize(w, scale, zp, 1 if axis is None else axis)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    info = np.iinfo(dtype)
    assert (got == info.min).any() or (got == info.max).any(), "no saturated value: the test misses clipping"


def _refuse(model, match):
    with pytest.raises(CompileError, match=match):
        compile_graph(model, TrainSpec())


def test_float_weights_are_named(corpus):
    """Activation-only QDQ (weights left float, e.g. an export with weight quantizers off)."""
    m = onnx.ModelProto()
    m.CopyFrom(corpus("digits_cnn", "fakequant"))
    q_nodes = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.name.endswith("_fq")]
    assert q_nodes
    for q in q_nodes:
        dq = next(n for n in m.graph.node if n.input and n.input[0] == q.output[0])
        for n in m.graph.node:
            n.input[:] = [q.input[0] if i == dq.output[0] else i for i in n.input]
        m.graph.node.remove(dq)
        m.graph.node.remove(q)
    _refuse(m, r"no weight sites: weights are float initializers with no QuantizeLinear \(activations only are "
               r"quantized\) \(4 nodes, e\.g\. 'conv1'\)\. Quantize the weights")


def test_block_quantized_and_matmulnbits_are_named():
    w = helper.make_tensor("w", TensorProto.INT4, [4, 8], list(np.arange(32) % 16 - 8))
    s = numpy_helper.from_array(np.full((4, 2), 0.1, np.float32), "s")
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], name="dq_block", axis=1, block_size=4),
             helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])], [w, s])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    _refuse(m, "block-quantized DequantizeLinear \\(block_size 4\\)")
    nbits = helper.make_node("MatMulNBits", ["x", "wq", "sc"], ["y"], name="mm4", domain="com.microsoft",
                             K=4, N=8, bits=4, block_size=16)
    g = helper.make_graph([nbits], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
                          [numpy_helper.from_array(np.zeros((8, 1, 8), np.uint8), "wq"),
                           numpy_helper.from_array(np.ones(8, np.float32), "sc")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    _refuse(m, "MatMulNBits")


@pytest.mark.parametrize("arch,dialect", [(a, d) for a, d in CASES if d in ("qdq_asym", "qdq_asym_s8", "qoperator",
                                                                             "dynamic", "fakequant", "int4")])
def test_untrained_export_computes_the_source_function(corpus, arch, dialect, tmp_path):
    """Widening (zero point included) and narrowing are exact: exporting the initial state gives back the
    source's function bit for bit."""
    from fgcompile.compiler import compile_model, write_compiled
    from fgcompile.runtime.export import export_model
    source = corpus(arch, dialect)
    compiled = compile_model(source, TrainSpec(m=2, last=2, estimator="sign"))
    assert any(s.widened for s in compiled.contract.state)
    write_compiled(compiled, tmp_path / "out")
    export_model(tmp_path / "out", tmp_path / "adapted.onnx")
    x = np.random.default_rng(3).uniform(0, 1, (32, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(outputs(onnx.load(str(tmp_path / "adapted.onnx")), x), outputs(source, x))


def _one_product(nodes, inits, x_type=TensorProto.FLOAT):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_type, ["b", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def test_weights_through_transpose_and_integer_products_are_named():
    w = numpy_helper.from_array(np.ones((3, 4), np.int8), "W")
    s, zp = numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.int8(0), "zp")
    through = _one_product([helper.make_node("DequantizeLinear", ["W", "s", "zp"], ["wd"], name="dq"),
                            helper.make_node("Transpose", ["wd"], ["wt"], name="t"),
                            helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm")], [w, s, zp])
    _refuse(through, r"weights pass through other ops between DequantizeLinear and the product \(.*\) "
                     r"\(1 nodes, e\.g\. 'mm'\)")
    wt = numpy_helper.from_array(np.ones((4, 3), np.int8), "W")
    integer = _one_product([helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dql"),
                            helper.make_node("MatMulInteger", ["xq", "W", "xz"], ["acc"], name="mmi"),
                            helper.make_node("Cast", ["acc"], ["accd"], name="c", to=TensorProto.DOUBLE),
                            helper.make_node("Cast", ["accd"], ["y"], name="c2", to=TensorProto.FLOAT)], [wt])
    _refuse(integer, "weights are integers consumed by MatMulInteger/ConvInteger without the Cast to float")
