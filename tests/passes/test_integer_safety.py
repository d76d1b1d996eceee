"""Saturating integer arithmetic at the extremes: weights at the ends of their range, the largest ε,
the widest perturbation, many perturbations and an lr input far above lr_max. The reference computes in
int64 and clips, so any int32 wrap in the graph shows up as a mismatch."""
import numpy as np
import pytest
from onnx import numpy_helper

import qdq_graphs
from fgcompile.passes.pipeline import compile_graph
from fgcompile.spec import TrainSpec
from reference import qzoff
from steps import Steps


def extreme_model(dtype, bits):
    model = qdq_graphs.dense_chain(7, widths=(5, 6, 4), ops=("Gemm",), dtype=dtype)
    info = np.iinfo(dtype)
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == dtype and a.ndim == 2:  # weights alternate between the two ends of the range
            ends = np.where(np.indices(a.shape).sum(0) % 2 == 0, info.max, info.min).astype(dtype)
            init.CopyFrom(numpy_helper.from_array(ends, init.name))
        if a.dtype == np.int32 and a.ndim == 1:  # biases near the trainable int32 range (after widening)
            top = 2 ** 30 // (256 if bits == 16 and dtype == np.int8 else 1) - 5
            signs = np.where(np.arange(len(a)) % 2 == 0, 1, -1)
            init.CopyFrom(numpy_helper.from_array((signs * top).astype(np.int32), init.name))
    return model


@pytest.mark.parametrize("dtype,bits", [(np.int8, 8), (np.int8, 16), (np.int16, 16)])
@pytest.mark.parametrize("options", [
    dict(m=64, perturbation="gaussian", eps=4096, estimator="spsa", spsa_gain=60000.0, lr=3.0),
    dict(m=64, perturbation="rademacher", eps=4096, lr=2000.0, lr_shift=0),
    dict(m=5, perturbation="gaussian", eps=4096, lr=8.0, rounding="stochastic", lr_shift=16),
])
def test_extremes_saturate_like_int64_reference(dtype, bits, options):
    model = extreme_model(dtype, bits)
    # requant_bypass off: with the hidden layer's requantization kept, graph and oracle compute identical
    # activations, so gain 60000 (which turns float ULPs of d into integer coefficients) stays exact
    spec = TrainSpec(last=2, bits=bits, requant_bypass=False, **{"estimator": "sign", **options})
    compiled = compile_graph(model, spec)
    c = qzoff.contract(compiled.train)
    oracle = qzoff.InferenceOracle(model, c)
    run = Steps(compiled)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (8, 5)).astype(np.float32), rng.integers(0, 4, 8)
    state = compiled.state
    for k, lr in enumerate([2 ** 31 - 1, c["lr_numerator"]["max"], 1]):
        out = run(x, y, 0, k, lr, state)
        want, _ = qzoff.step(oracle, c, state, x, y, 0, k, lr)
        for s in c["state"]:
            np.testing.assert_array_equal(out[s["output"]], want[s["name"]])
            assert out[s["output"]].min() >= s["qmin"] and out[s["output"]].max() <= s["qmax"]
        state = {s["name"]: out[s["output"]] for s in c["state"]}
    assert any((state[k] != compiled.state[k]).any() for k in state)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("zero_points", [False, True])
def test_integer_products_are_exact_at_the_byte_extremes(dynamic, zero_points):
    # uint8 x int8 near 255 x ±127: onnxruntime's u8s8 kernel on x86 without AVX-VNNI adds byte-product pairs in
    # saturating int16, so Builder.integer_product reads such a weight as uint8 w + 128 (exact on every CPU)
    import onnx_graphsurgeon as gs
    from fgcompile.passes.graph_ops import Builder
    from fgcompile.session import make_session
    rng = np.random.default_rng(0)
    a = rng.integers(200, 256, (64, 96)).astype(np.uint8)
    w = np.where(rng.random((96, 24)) < 0.5, rng.integers(100, 128, (96, 24)), rng.integers(-128, -100, (96, 24))).astype(np.int8)
    za, zw = (np.uint8(3), np.int8(-5)) if zero_points else (None, None)
    graph = gs.Graph(opset=21)
    x = gs.Variable("a", dtype=np.uint8, shape=list(a.shape))
    right = gs.Variable("w", dtype=np.int8, shape=list(w.shape)) if dynamic else gs.Constant("w", w)
    graph.inputs = [x] + ([right] if dynamic else [])
    graph.outputs = [Builder(graph, "t").integer_product("MatMulInteger", x, right, za, zw)]
    feeds = {"a": a} | ({"w": w} if dynamic else {})
    got = make_session(gs.export_onnx(graph).SerializeToString(), 1).run(None, feeds)[0]
    want = (a.astype(np.int64) - (za or 0)) @ (w.astype(np.int64) - (zw or 0))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bound", [None, 64, 127])
def test_a_computed_operand_within_its_bound_stays_signed_and_exact(bound):
    # node's signal V (|V| <= m <= 64) skips the unsigned offset; at |w| = 64 the pair sum 2·255·64 still fits int16
    import onnx_graphsurgeon as gs
    from fgcompile.passes.graph_ops import Builder
    from fgcompile.session import make_session
    rng = np.random.default_rng(1)
    top = 64 if bound == 64 else 127
    a = rng.integers(250, 256, (64, 96)).astype(np.uint8)
    w = np.where(rng.random((96, 24)) < 0.5, top, -top).astype(np.int8)
    graph = gs.Graph(opset=21)
    x, right = gs.Variable("a", dtype=np.uint8, shape=list(a.shape)), gs.Variable("w", dtype=np.int8, shape=list(w.shape))
    graph.inputs = [x, right]
    graph.outputs = [Builder(graph, "t").integer_product("MatMulInteger", x, right, bound=bound)]
    model = gs.export_onnx(graph)
    import onnx
    unsigned = [n for n in model.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.UINT8]
    assert len(unsigned) == (1 if bound in (None, 127) else 0)
    got = make_session(model.SerializeToString(), 1).run(None, {"a": a, "w": w})[0]
    np.testing.assert_array_equal(got, a.astype(np.int64) @ w.astype(np.int64))
