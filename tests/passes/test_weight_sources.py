"""Weights, scales and zero points however the exporter wrote them (initializers, Constant nodes, read
through Identity nodes, float weights through QuantizeLinear) compile to the same sites and train to the
same weights; what cannot be folded is named for what it is; inspect accounts for every product; --freeze
keeps chosen sites out of training."""
import pathlib
import sys

import numpy as np
import onnx
import pytest

from conftest import MODELS, shipped
from qdq_graphs import conv_chain, dense_chain, qdq_model
from steps import Steps
from weight_sources import as_constants, fake_quant, float16_weight, products, stft_frontend
from fgcompile.errors import CompileError, SpecError
from fgcompile.inspection import format_inspection, inspect_graph
from fgcompile.passes import canonicalize
from fgcompile.passes.dialects import constants
from fgcompile.passes.pipeline import compile_graph
from fgcompile.session import make_session
from fgcompile.spec import TrainSpec
from test_step_matches_reference import run_chain

sys.path.insert(0, str(MODELS / "recipes"))
import build_dialects  # noqa: E402

RESNET = pathlib.Path(__file__).resolve().parents[1] / "data" / "resnet18_fakequant.onnx"   # build_fakequant.py
SHIPPED = [f"{arch}/{form}.onnx" for arch in ("digits_cnn", "kws_dscnn", "digits_attn") for form in ("w8a8", "w16a8")]
PRODUCTS = ("Conv", "Gemm", "MatMul")
LEFTOVER_PRODUCTS = ("MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "QGemm")   # dialects may leave


def feeds(model, n=16, seed=0):
    """Random inputs and labels for a model's one data input and [batch, classes] output."""
    x = model.graph.input[0].type.tensor_type.shape.dim
    shape = [n] + [d.dim_value for d in x[1:]]
    classes = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, shape).astype(np.float32), rng.integers(0, classes, n)


def train(model, spec, steps=3):
    """The states after each of `steps` training steps (values only, in contract order)."""
    compiled = compile_graph(model, spec)
    run, (x, y) = Steps(compiled), feeds(model)
    state, states = dict(compiled.state), []
    for k in range(steps):
        state = run.next_state(run(x, y, seed=1, step=k, state=state))
        states.append([state[s.name] for s in compiled.contract.state])
    return compiled, states


def rewrites(source):
    """The source as exporters other than quantize_static write it (see tests/weight_sources.py)."""
    return {"Constant nodes": as_constants(source), "fake-quant Constant nodes": as_constants(fake_quant(source)),
            "fake-quant, zero points through Identity": as_constants(fake_quant(source), constants=False)}


def test_the_rewrite_is_what_torchscript_writes():
    """The test model holds no initializer; each zero point is stored once, its later readers read it
    through an Identity each; it computes what the source computes."""
    source = shipped("kws_dscnn/w8a8.onnx")
    m = as_constants(source)
    assert not m.graph.initializer
    identities = [n for n in m.graph.node if n.op_type == "Identity"]
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in source.graph.initializer}
    distinct = {(inits[n.input[2]].dtype.str, inits[n.input[2]].shape, inits[n.input[2]].tobytes())
                for n in source.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert len(qdq) - len(identities) == len(distinct) < len(qdq) / 4   # one stored source per zero point
    x, _ = feeds(m)
    want = make_session(source).run(None, {"x": x})[0]
    np.testing.assert_array_equal(make_session(m).run(None, {"x": x})[0], want)
    canonical, notes = canonicalize.canonical(m)   # and so does what the passes read
    assert notes[0].startswith(f"{len(m.graph.node) - len(source.graph.node)} Constant nodes and Identity copies")
    np.testing.assert_array_equal(make_session(canonical).run(None, {"x": x})[0], want)


@pytest.mark.parametrize("name", SHIPPED)
def test_constant_and_identity_sources_compile_to_the_same_sites(name):
    """Before: no weight site at all from Constant nodes ("weights are computed in the graph", or "go through
    a QuantizeLinear that cannot be folded (block or float8 quantization)"); through Identity nodes only
    the first reader of each zero point (kws_dscnn: 2 of 10), the others listed nowhere."""
    source = shipped(name)
    for rewritten in rewrites(source).values():
        rows, floats = inspect_graph(rewritten, m=2)
        want, want_floats = inspect_graph(source, m=2)
        strip = lambda rs: [(r.site, r.op, r.role, r.shape, r.dtype, r.axis, r.grid, r.train_bytes) for r in rs]
        assert strip(rows) == strip(want) and floats == want_floats


@pytest.mark.parametrize("arch", ["digits_cnn", "kws_dscnn", "digits_attn"])
def test_rewritten_model_trains_to_the_same_weights(arch):
    """Every product site trains, from the Constant/Identity model and from the original: the same state,
    bit for bit, after each step (the sites share zero points in the rewritten model)."""
    source = shipped(f"{arch}/w8a8.onnx")
    n = sum(n.op_type in PRODUCTS for n in source.graph.node) - (2 if arch == "digits_attn" else 0)
    spec = TrainSpec(m=2, last=n, estimator="sign")
    compiled, states = train(source, spec)
    for rewritten in rewrites(source).values():
        again, again_states = train(rewritten, spec)
        assert [(s.site, s.role, s.shape, s.dtype) for s in again.contract.state] == \
               [(s.site, s.role, s.shape, s.dtype) for s in compiled.contract.state]
        for step, (a, b) in enumerate(zip(states, again_states)):
            for u, v in zip(a, b):
                np.testing.assert_array_equal(u, v, err_msg=f"step {step}")
    assert any((u != v).any() for u, v in zip(states[-1], compiled.state.values()))


def test_rewritten_model_steps_match_the_reference(target_train):
    run_chain(as_constants(fake_quant(shipped("digits_cnn/w8a8.onnx"))), TrainSpec(m=2, last=2, estimator="sign"), target_train,
              steps=3)


def test_widened_shared_zero_points_stay_one_per_weight():
    """Two sites reading one zero point both widen: each gets its own widened zero point, and the graph is valid."""
    m = as_constants(dense_chain(0, widths=(6, 6, 6, 5), ops=("Gemm",)))
    shared = [n for n in m.graph.node if n.op_type == "Identity"]
    assert len({n.input[0] for n in shared}) < len(shared)
    compiled = compile_graph(m, TrainSpec(m=2, last=3, estimator="sign"))
    onnx.checker.check_model(compiled.train)
    make_session(compiled.train)


def test_constants_keep_graph_outputs_subgraph_names_and_tied_weights():
    """A Constant or Identity whose output is a graph output stays; a tied weight read through two Identity
    nodes stays one tensor (select refuses to train it as two)."""
    m = as_constants(qdq_model(tie=True))
    tied = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "W"]
    for k, dq in enumerate(tied):
        m.graph.node.append(onnx.helper.make_node("Identity", ["W"], [f"W_copy{k}"], name=f"copy{k}"))
        dq.input[0] = f"W_copy{k}"
    m.graph.output.append(onnx.helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, []))
    nodes = sorted(m.graph.node, key=lambda n: n.op_type not in ("Constant", "Identity"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    canonical, notes = canonicalize.canonical(m)
    assert notes and [n.op_type for n in canonical.graph.node].count("Constant") == 1   # "s", a graph output
    assert {n.input[0] for n in canonical.graph.node if n.name in ("dqw", "dqw2")} == {"W"}
    with pytest.raises(CompileError, match="'W' is shared by 2 nodes"):
        compile_graph(m, TrainSpec(m=2))


def test_constants_keep_names_a_subgraph_reads():
    """An Identity whose output an If branch reads by name stays (the Constant it reads becomes an
    initializer, visible in the branch too); the model computes the same."""
    h = onnx.helper
    branch = lambda k: h.make_graph([h.make_node("Add", ["c_copy", "x"], [f"out{k}"])], f"b{k}", [],
                                    [h.make_tensor_value_info(f"out{k}", onnx.TensorProto.FLOAT, [2])])
    nodes = [h.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(np.float32([1, 2]), "c")),
             h.make_node("Identity", ["c"], ["c_copy"]),
             h.make_node("If", ["flag"], ["y"], then_branch=branch(0), else_branch=branch(1))]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("flag", onnx.TensorProto.BOOL, []),
                                  h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    m.ir_version = 10
    canonical, _ = canonicalize.canonical(m)
    assert [n.op_type for n in canonical.graph.node] == ["Identity", "If"] and canonical.graph.initializer[0].name == "c"
    feed = {"flag": np.array(True), "x": np.float32([3, 4])}
    np.testing.assert_array_equal(make_session(canonical).run(None, feed)[0], make_session(m).run(None, feed)[0])


def test_constants_leave_initializer_models_alone():
    for name in SHIPPED:
        m = shipped(name)
        assert constants.run(m) == 0


CANNOT_FOLD = {
    "float16 weight": (float16_weight, "a float16 weight: fgcompile folds float32 weights only"),
    "float8 grid": (lambda: _float8_weight(), "quantization to float8_e4m3fn, a float grid fgcompile does not train"),
    "computed scale": (lambda: _computed_scale(), "its scale is computed in the graph, not stored"),
}


def _float8_weight():
    m = float16_weight()
    for t in m.graph.initializer:
        if t.name == "W":
            t.CopyFrom(onnx.numpy_helper.from_array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), "W"))
        if t.name == "s":
            t.CopyFrom(onnx.numpy_helper.from_array(np.float32(0.01), "s"))
        if t.name == "zp":
            t.CopyFrom(onnx.helper.make_tensor("zp", onnx.TensorProto.FLOAT8E4M3FN, [], [0.0]))
    nodes = [n for n in m.graph.node if n.op_type != "Cast"]
    nodes[-1].input[0], nodes[-1].output[0] = "x", "y"
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return as_constants(m)


def _computed_scale():
    m = as_constants(fake_quant(qdq_model()))
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0].endswith("_float"))
    m.graph.node.insert(list(m.graph.node).index(q), onnx.helper.make_node("Abs", [q.input[1]], ["s_abs"], name="abs"))
    q.input[1] = "s_abs"
    return m


@pytest.mark.parametrize("case", list(CANNOT_FOLD))
def test_what_cannot_fold_is_named(case):
    """Before: "weights go through a QuantizeLinear that cannot be folded (block or float8 quantization)" for
    every one of these, whatever it was."""
    build, reason = CANNOT_FOLD[case]
    model = build()
    with pytest.raises(CompileError) as err:
        compile_graph(model, TrainSpec(m=2))
    message = str(err.value)
    assert message.startswith("no weight sites: weights go through a QuantizeLinear that cannot be folded")
    assert reason in message and "\n" not in message
    _, floats = inspect_graph(model)
    assert [f.kind for f in floats] == ["q_unfolded"] and reason in floats[0].why


def accounting_models():
    yield from ((name, shipped(name)) for name in SHIPPED)
    yield from ((f"constants {name}", as_constants(shipped(name))) for name in SHIPPED[::2])
    yield "fake-quant constants", as_constants(fake_quant(shipped("kws_dscnn/w8a8.onnx")))
    yield "torch fake-quant ResNet-18", onnx.load(RESNET)
    yield "stft", stft_frontend()
    yield "float16", float16_weight()
    yield "float8", _float8_weight()
    yield "computed scale", _computed_scale()
    yield "dense", dense_chain(1)
    yield "conv", conv_chain(1)
    for dialect in ("dynamic", "qoperator"):
        yield dialect, build_dialects.build("digits_attn", dialect)


def test_inspect_accounts_for_every_product():
    """Every Conv/Gemm/MatMul (and every product a dialect left) is a site or a row saying why it is not."""
    for label, model in accounting_models():
        graph_nodes = canonicalize.canonical(model)[0].graph.node
        products = [n.name for n in graph_nodes if n.op_type in PRODUCTS + LEFTOVER_PRODUCTS]
        rows, floats = inspect_graph(model, m=2)
        sites = {r.site for r in rows if r.op not in ("LayerNormalization", "BatchNormalization")}
        listed = sorted(sites | {f.node for f in floats if f.kind != "recurrent"})
        assert listed == sorted(products), label
        assert not sites & {f.node for f in floats}, label
        assert all(f.why for f in floats), label


def test_torchscript_fakequant_resnet18_trains_every_conv():
    """A real torch.onnx.export(dynamo=False) of a fake-quant ResNet-18 (models/recipes/build_fakequant.py):
    activation scales and zero points are Constant nodes, and the weights' zero points one initializer per
    shape that later layers read through Identity nodes. Before: 5 of its 21 products were sites, none of
    the others listed, and --last 2 trained blocks.6.conv1 and fc. After: all 21, and --last 2 is the last two."""
    model = onnx.load(RESNET)
    assert sum(n.op_type == "Identity" for n in model.graph.node) >= 12
    assert sum(n.op_type == "Constant" for n in model.graph.node) >= 20
    rows, floats = inspect_graph(model, m=2)
    assert sorted({r.site for r in rows}) == sorted(products(model)) and len(products(model)) == 21 and not floats
    compiled = compile_graph(model, TrainSpec(m=2, last=2, estimator="sign"))
    last_two = ["/blocks/blocks.7/conv2/Conv", "/fc/Gemm"]
    assert [s.site for s in compiled.contract.state if s.role == "weight"] == last_two


def test_torchscript_fakequant_resnet18_steps_match_the_reference(target_train):
    run_chain(onnx.load(RESNET), TrainSpec(m=2, last=2, estimator="sign"), target_train, steps=3)


def test_attention_products_say_they_have_no_weight():
    rows, floats = inspect_graph(shipped("digits_attn/w8a8.onnx"))
    table = format_inspection(rows, floats)
    assert {f.node for f in floats} == {"qk", "att.v"}
    assert "no weight: qk (MatMul" in table and "stays float" not in table


def test_fixed_transform_note():
    """The STFT-like basis (258x1x256, no bias, on the input) gets a note; shipped convs and the 1x1 conv do not."""
    rows, floats = inspect_graph(stft_frontend())
    notes = {r.site: r.note for r in rows if r.note}
    assert list(notes) == ["conv10"] and "--freeze '^conv10$'" in notes["conv10"]
    assert "note: conv10 (Conv 258x1x256, no bias, on the model input 'wave') looks like a fixed transform" in \
        format_inspection(rows, floats)
    for name in SHIPPED:
        assert not any(r.note for r in inspect_graph(shipped(name))[0]), name


def trained(spec, model=None):
    return [(s.site, s.role) for s in compile_graph(model or stft_frontend(), spec).contract.state]


def test_freeze_keeps_a_site_out_whatever_last_and_train_say():
    assert trained(TrainSpec(m=2, last=3, estimator="sign"))[0] == ("conv10", "weight")
    assert trained(TrainSpec(m=2, last=2, estimator="sign", freeze=("conv10",))) == \
        [("conv26", "weight"), ("conv26", "bias"), ("gemm47", "weight"), ("gemm47", "bias")]
    assert trained(TrainSpec(m=2, train=("conv",), freeze=("^conv10$",))) == [("conv26", "weight"), ("conv26", "bias")]
    # --last counts the sites left: freezing the last site moves --last 1 to the one before it
    assert trained(TrainSpec(m=2, freeze=("gemm",))) == [("conv26", "weight"), ("conv26", "bias")]
    # a bias name freezes its whole site
    assert trained(TrainSpec(m=2, last=2, estimator="sign", freeze=("B42",))) == [("conv10", "weight"), ("conv26", "weight"),
                                                                  ("conv26", "bias")]


FREEZE_REFUSED = {
    "matches nothing": (dict(freeze=("nothing",)),
                        "--freeze 'nothing' matches no weight site. Sites: conv10, conv26, gemm47."),
    "invalid regex": (dict(freeze=("(",)), "--freeze '(': not a valid regular expression"),
    "freezes everything": (dict(freeze=(".",)), "--freeze '.' freezes every weight site (conv10, conv26, gemm47); "
                                                 "nothing is left to train"),
    "last beyond what is left": (dict(freeze=("conv10",), last=3, estimator="sign"),
                                 "--last 3: the model has only 2 weight sites that --freeze leaves (1 frozen)"),
    "train only frozen": (dict(freeze=("conv10",), train=("conv10",)),
                          "--train 'conv10' matches no weight site that --freeze 'conv10' leaves"),
}


@pytest.mark.parametrize("case", list(FREEZE_REFUSED))
def test_freeze_refusals(case):
    fields, message = FREEZE_REFUSED[case]
    with pytest.raises(SpecError) as err:
        compile_graph(stft_frontend(), TrainSpec(m=2, **fields))
    assert message in str(err.value)
