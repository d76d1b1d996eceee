"""--forward exact: the frozen quantized ops compute the reference's integer results (docs/reference.md,
"Exact forward"), every runtime level agrees, and the results stay within one LSB of the source's QDQ ops."""
import numpy as np
import onnx
import pytest

from conftest import shipped
from fgcompile import models
from fgcompile.passes.pipeline import compile_graph
from fgcompile.spec import TrainSpec
from reference import qzoff
from steps import Steps
from test_node_estimator import run_chain as activation_chain
from test_step_matches_reference import run_chain as weight_chain

LEVELS = ["disable", "basic", "extended", "all"]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("model_file,options", [
    ("digits_cnn/w8a8.onnx", dict(m=4)),                        # frozen Convs (float kernels) and fc1 (Gemm)
    ("digits_attn/w8a8.onnx", dict(m=4)),                       # MatMuls of two activations, bias and residual Adds
    ("digits_cnn/w8a8.onnx", dict(last=2, m=2, branches="cloned")),  # a frozen suffix in every branch copy
    ("digits_cnn/w8a8.onnx", dict(train=("conv2",), m=2, branches="loop")),  # frozen fc1 inside a Loop body
])
def test_weight_perturbation_matches_reference(model_file, options, target_train):
    weight_chain(model_file, TrainSpec(forward="exact", estimator="sign", **options), target_train, steps=6)


@pytest.mark.parametrize("estimator,model_file,last", [("head", "digits_cnn/w8a8.onnx", 1),
                                                       ("node", "digits_cnn/w8a8.onnx", 2),
                                                       ("node", "digits_attn/w8a8.onnx", 3)])
def test_activation_estimators_match_reference(estimator, model_file, last, target_train):
    reference = qzoff.head_step if estimator == "head" else qzoff.node_step
    assert activation_chain(model_file, TrainSpec(forward="exact", estimator=estimator, last=last), target_train, 4,
                            reference=reference) > 0


def test_keyword_spotter_matches_reference():
    """Depthwise Convs (float kernels), a ReduceMean pool, the defaults' head estimator."""
    data = models.split("kws_dscnn", "target_train")
    assert activation_chain("kws_dscnn/w8a8.onnx", TrainSpec(forward="exact", estimator="head"), data, 3,
                            reference=qzoff.head_step) > 0


def test_the_reference_runs_integer_kernels(target_train):
    """The reference's oracle computes the frozen products with onnxruntime's integer ops (ConvInteger,
    MatMulInteger), not the float kernels the compiled graph uses, and LayerNormalization and Softmax by
    trying every output level at once, not by bisection: the chains above compare two routes."""
    compiled = compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(forward="exact", estimator="sign"))
    c = qzoff.contract(compiled.train)
    ops = _ops(qzoff.InferenceOracle(compiled.source, c).model)
    assert ops.count("ConvInteger") == 2 and ops.count("MatMulInteger") == 1 and "Conv" not in ops
    compiled = compile_graph(shipped("digits_attn/w8a8.onnx"), TrainSpec(forward="exact", estimator="sign"))
    c = qzoff.contract(compiled.train)
    ops = _ops(qzoff.InferenceOracle(compiled.source, c).model)     # the layer norms and the attention's Softmax
    assert "LayerNormalization" not in ops and "Softmax" not in ops and ops.count("Gather") == 1


@pytest.mark.parametrize("limit,ops", [(2 ** 18, {"Slice", "MatMulInteger"}), (2 ** 10, {"ConvInteger"})])
def test_wide_sums_split_or_take_the_integer_kernels(limit, ops, monkeypatch):
    """Where 255·Σ|w| of an output reaches 2^24 a runtime that accumulates in float32 (OpenVINO's
    MatMulInteger) could round: the reduction splits into pieces of K that stay below it, or, where one
    input alone reaches it, one ConvInteger/MatMulInteger runs whole. Scaled down here (the shipped models
    stay below 2^24): the steps are the same integers either way."""
    from fgcompile.passes import exact_forward
    source = shipped("digits_cnn/w8a8.onnx")
    narrow = compile_graph(source, TrainSpec(forward="exact"))
    monkeypatch.setattr(exact_forward, "EXACT", limit)
    wide = compile_graph(source, TrainSpec(forward="exact"))
    assert all(_ops(wide.train).count(op) > _ops(narrow.train).count(op) for op in ops)
    x, y = models.split("digits_cnn", "target_train")
    a, b = (Steps(c)(x[:32], y[:32], 7, 0, c.contract.lr_numerator.default, dict(c.state)) for c in (narrow, wide))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("model_file", ["digits_cnn/w8a8.onnx", "kws_dscnn/w8a8.onnx", "digits_attn/w8a8.onnx"])
def test_every_level_gives_the_same_step_and_the_source_is_kept(model_file):
    """No float product is left (the frozen ones exact, the trained one on integer planes: the head
    estimator's); every onnxruntime level computes the same step; and the exact requantizations compute the
    same model as the QDQ ops (the batch's loss within 1%)."""
    name = model_file.split("/")[0]
    x, y = models.split(name, "target_train")
    x, y = x[:32], y[:32]
    exact = compile_graph(shipped(model_file), TrainSpec(forward="exact"))
    qdq = compile_graph(shipped(model_file), TrainSpec())
    # (the passes' own nodes are named prefix/op_k: the exact forward's float kernels on integer values)
    assert not [n.name for n in exact.train.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and "/" not in n.name]
    state = dict(exact.state)
    runs = [Steps(exact, optimization=level)(x, y, 3, 0, exact.contract.lr_numerator.default, state)
            for level in LEVELS]
    for out in runs[1:]:
        for key in out:
            np.testing.assert_array_equal(out[key], runs[0][key], err_msg=key)
    a, b = (Steps(c)(x, y, 3, 0, c.contract.lr_numerator.default, dict(c.state)) for c in (exact, qdq))
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-2)


def test_a_batched_constant_matmul_stays_as_given():
    """A MatMul whose constant weight is 3-D (batched) has no exact form here: left as the source gives it,
    not an internal error."""
    import onnx_graphsurgeon as gs
    from fgcompile.passes import exact_forward
    x, d = gs.Variable("x", np.uint8, [2, 3, 4]), gs.Variable("d", np.float32, [2, 3, 4])
    w, y, q = gs.Variable("w", np.float32, [2, 4, 5]), gs.Variable("y", np.float32, [2, 3, 5]), gs.Variable("q", np.uint8)
    graph = gs.Graph(nodes=[
        gs.Node("DequantizeLinear", "dx", {}, [x, gs.Constant("sx", np.array(0.1, np.float32)),
                                               gs.Constant("zx", np.array(3, np.uint8))], [d]),
        gs.Node("DequantizeLinear", "dw", {}, [gs.Constant("wq", np.ones([2, 4, 5], np.int8)),
                                               gs.Constant("sw", np.array(0.1, np.float32))], [w]),
        gs.Node("MatMul", "mm", {}, [d, w], [y]),
        gs.Node("QuantizeLinear", "qy", {}, [y, gs.Constant("sy", np.array(0.2, np.float32)),
                                             gs.Constant("zy", np.array(0, np.uint8))], [q])], inputs=[x], outputs=[q])
    assert exact_forward._rewrite(graph, set(), 1) == 0 and [n.op for n in graph.nodes].count("MatMul") == 1


@pytest.mark.parametrize("model_file,options", [
    ("kws_dscnn/w8a8.onnx", dict(last=2)),        # rows and depthwise Convs, a mean; node's stacked suffix
    ("digits_attn/w8a8.onnx", dict()),            # layer norms, Softmax, MatMuls of two activations, Adds
])
def test_batch_slices_give_the_same_steps_everywhere(model_file, options, monkeypatch):
    """Every exact op in 5 slices of the batch (batch_chunks; at real sizes only the large ones are sliced):
    its transients a slice at a time, the same integers. 3 chained steps at batch 32 (slices of 6-7) and one
    at batch 3 (two empty slices) equal the unsliced compile's on every supported runtime here, and at batch
    32 onnxruntime's unoptimized baseline's."""
    from fgcompile.passes import batch_chunks, exact_forward
    from fgcompile.runtime import conformance
    spec = TrainSpec(forward="exact", **options)
    whole = compile_graph(shipped(model_file), spec)
    monkeypatch.setattr(exact_forward, "CHUNK_BYTES", 1)
    monkeypatch.setattr(batch_chunks, "MAX_CHUNKS", 5)
    sliced = compile_graph(shipped(model_file), spec)
    assert sum("/chunks_" in n.name for n in sliced.train.graph.node) >= 8
    x, y = models.split(model_file.split("/")[0], "target_train")
    batches = [(x[k * 32:(k + 1) * 32], y[k * 32:(k + 1) * 32]) for k in range(3)] + [(x[:3], y[:3])]
    base = conformance.chain(whole.train, whole.contract, whole.state, batches[:3], conformance.BASELINE)
    for runtime in [r for r in conformance.installed() if r.supported]:
        got = conformance.chain(sliced.train, sliced.contract, sliced.state, batches, runtime)
        assert conformance.first_difference(base, got[:3]) is None, f"{runtime.name} {runtime.config}"
        same = conformance.chain(whole.train, whole.contract, whole.state, batches, runtime)
        assert conformance.first_difference(same, got) is None, f"{runtime.name} {runtime.config}"


def test_an_input_of_lower_rank_is_read_whole_by_every_slice(monkeypatch):
    """A stacked suffix adds the clean [B, ...] side branch to the branches' [n, B, ...]: sliced along n, the
    slices each read the lower-rank operand whole (sliced along its own first axis it would be wrong)."""
    import onnx_graphsurgeon as gs
    from fgcompile.passes import batch_chunks, exact_forward
    from fgcompile.session import make_session

    def graph():
        a, c = gs.Variable("a", np.uint8, [6, 4, 5]), gs.Variable("c", np.uint8, [4, 5])
        da, dc = gs.Variable("da", np.float32, [6, 4, 5]), gs.Variable("dc", np.float32, [4, 5])
        s, q = gs.Variable("s", np.float32, [6, 4, 5]), gs.Variable("q", np.uint8, [6, 4, 5])
        const = lambda name, v: gs.Constant(name, np.array(v))
        return gs.Graph(nodes=[
            gs.Node("DequantizeLinear", "dqa", {}, [a, const("sa", np.float32(0.05)), const("za", np.uint8(7))], [da]),
            gs.Node("DequantizeLinear", "dqc", {}, [c, const("sc", np.float32(0.03)), const("zc", np.uint8(3))], [dc]),
            gs.Node("Add", "add", {}, [da, dc], [s]),
            gs.Node("QuantizeLinear", "qs", {}, [s, const("ss", np.float32(0.07)), const("zs", np.uint8(11))], [q])],
            inputs=[a, c], outputs=[q], opset=21)

    rng = np.random.default_rng(0)
    feeds = {"a": rng.integers(0, 256, (6, 4, 5), dtype=np.uint8), "c": rng.integers(0, 256, (4, 5), dtype=np.uint8)}
    whole = graph()
    assert exact_forward._rewrite(whole, set(), 1) == 1
    monkeypatch.setattr(exact_forward, "CHUNK_BYTES", 1)
    monkeypatch.setattr(batch_chunks, "MAX_CHUNKS", 4)
    sliced = graph()
    assert exact_forward._rewrite(sliced, set(), 1) == 1 and sum(n.op == "Concat" for n in sliced.nodes) == 1
    run = lambda g: make_session(gs.export_onnx(g.cleanup().toposort())).run(None, feeds)[0]
    np.testing.assert_array_equal(run(sliced), run(whole))
