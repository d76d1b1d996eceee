"""Property tests on generated QDQ graphs: compile never crashes, the result passes onnx.checker and
loads in onnxruntime, and one step matches the numpy reference bit for bit (examples whose loss
difference sits at float32 resolution, within 2x of the tie threshold, are rejected and replaced)."""
import numpy as np
import onnx
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import qdq_graphs
from fgcompile.passes.pipeline import compile_graph
from fgcompile.spec import TrainSpec
from reference import qzoff
from steps import run_step


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2 ** 16))
    dtype = draw(st.sampled_from([np.int8, np.int16]))
    per_channel = draw(st.booleans())
    if draw(st.booleans()):
        widths = tuple(draw(st.lists(st.integers(2, 8), min_size=2, max_size=4)))
        ops = tuple(draw(st.lists(st.sampled_from(["Gemm", "MatMul"]), min_size=1, max_size=3)))
        model = qdq_graphs.dense_chain(seed, widths, ops, dtype, per_channel, relu=draw(st.booleans()))
        x_shape = (6, widths[0])
    else:
        channels = (draw(st.integers(1, 3)),) + tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
        model = qdq_graphs.conv_chain(seed, channels, hw=4, classes=3, dtype=dtype, per_channel=per_channel)
        x_shape = (6, channels[0], 4, 4)
    sites = sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in model.graph.node)
    perturbation = draw(st.sampled_from(["rademacher", "ternary", "gaussian"]))
    spec = TrainSpec(m=draw(st.integers(1, 3)), last=draw(st.integers(1, sites)), perturbation=perturbation,
                     density=draw(st.sampled_from([0.1, 0.5])) if perturbation == "ternary" else 1.0,
                     bits=draw(st.sampled_from([8, 16])), rounding=draw(st.sampled_from(["nearest", "stochastic"])),
                     estimator=draw(st.sampled_from(["sign", "spsa"])), spsa_gain=5000.0,
                     include_bias=draw(st.booleans()), eps=draw(st.integers(1, 300)), lr=draw(st.sampled_from([0.5, 3.0, 40.0])))
    return model, spec, x_shape, seed


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_generated_graph_compiles_and_matches_reference(case):
    model, spec, x_shape, seed = case
    compiled = compile_graph(model, spec)
    onnx.checker.check_model(compiled.train, full_check=True)
    c = qzoff.contract(compiled.train)
    oracle = qzoff.InferenceOracle(model, c)
    for name, value in compiled.state.items():
        np.testing.assert_array_equal(value, oracle.initial[name])
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, x_shape).astype(np.float32)
    y = rng.integers(0, model.graph.output[0].type.tensor_type.shape.dim[1].dim_value, x_shape[0])
    lr = int(rng.integers(0, 2 * c["lr_numerator"]["default"] + 1))
    out = run_step(compiled, x, y, seed, seed % 1000, lr)
    want, diag = qzoff.step(oracle, c, compiled.state, x, y, seed, seed % 1000, lr)
    # a loss difference at float32 resolution has no reproducible sign: not a case a reference can judge
    assume(not diag["near_tie"])
    for s in c["state"]:
        np.testing.assert_array_equal(out[s["output"]], want[s["name"]])
