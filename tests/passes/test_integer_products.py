"""The node and head estimators' trained products on int8 planes (passes/integer_products.py): the split is
exact over the whole int16 range, no float product reads a trained weight, the pieces of --forward exact
give the same step as one product, and what stays float is named. That the steps equal the reference's
(qzoff.integer_products) is test_node_estimator's and test_head_estimator's chains."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from conftest import shipped
from fgcompile import models
from fgcompile.passes import integer_products
from fgcompile.passes.exact_forward import EXACT
from fgcompile.passes.graph_ops import Builder
from fgcompile.passes.pipeline import compile_graph
from fgcompile.session import make_session
from fgcompile.spec import TrainSpec
from steps import Steps


def test_the_split_is_exact_over_the_int16_range():
    """W = 256·((W_hi + 128) − 128) + W_lo with W_hi = ⌊W/256⌋ for every int16 W, both planes uint8 (uint8 × uint8
    products are exact in onnxruntime on every CPU: graph_ops.Builder.integer_product)."""
    graph = gs.Graph(opset=21)
    w = gs.Variable("w", dtype=np.int16, shape=[65536])
    graph.inputs = [w]
    graph.outputs = integer_products._split(Builder(graph, "t"), w)
    session = make_session(gs.export_onnx(graph).SerializeToString(), 1)
    values = np.arange(-32768, 32768, dtype=np.int16)
    hi, lo = session.run(None, {"w": values})
    assert hi.dtype == lo.dtype == np.uint8
    np.testing.assert_array_equal(hi.astype(np.int64) - 128, np.floor_divide(values.astype(np.int64), 256))
    np.testing.assert_array_equal(256 * (hi.astype(np.int64) - 128) + lo.astype(np.int64), values)


def _float_products_of_trained_weights(model: onnx.ModelProto, state: set) -> list[str]:
    """Conv/Gemm/MatMul nodes (in the graph and its Loop bodies) whose weight is DequantizeLinear(state)."""
    made = {}
    found = []

    def walk(g):
        for n in g.node:
            if n.op_type == "DequantizeLinear" and n.input[0] in state:
                made[n.output[0]] = n
        for n in g.node:
            if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in made:
                found.append(n.name)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
    walk(model.graph)
    return found


@pytest.mark.parametrize("model_file,spec", [
    ("digits_cnn/w8a8.onnx", TrainSpec(estimator="node", m=2, last=3)),                     # Conv, Gemms, Loop
    ("digits_cnn/w8a8.onnx", TrainSpec(estimator="node", m=2, last=3, branches="stacked")),
    ("digits_attn/w8a8.onnx", TrainSpec(estimator="node", m=2, last=3)),                    # MatMul [B, T, K]
    ("digits_cnn/w8a8.onnx", TrainSpec(estimator="head", bits=8, headroom=1)),              # one int8 plane
])
def test_no_float_product_reads_a_trained_weight(model_file, spec):
    compiled = compile_graph(shipped(model_file), spec)
    state = {s.name for s in compiled.contract.state}
    assert _float_products_of_trained_weights(compiled.train, state) == []
    kernels = [n for n in compiled.train.graph.node if n.op_type == "MatMulInteger" and "integer_products" in n.name]
    assert kernels, "the products run as MatMulInteger"
    assert any("run on int8 kernels" in note for note in compiled.notes)


def test_a_grouped_conv_stays_float_and_is_named():
    """The keyword spotter's depthwise conv (block3.dw) keeps its float product; the note names it."""
    compiled = compile_graph(shipped("kws_dscnn/w8a8.onnx"), TrainSpec(estimator="node", m=2, last=3))
    note = next(n for n in compiled.notes if "run on int8 kernels" in n)
    assert "grouped Conv" in note
    state = {s.name for s in compiled.contract.state}
    left = _float_products_of_trained_weights(compiled.train, state)
    assert left and all("dw" in name for name in left)


def test_the_pieces_of_the_exact_forward_give_the_same_step(monkeypatch):
    """--forward exact splits each product's K into pieces whose partial sums stay below 2^24 (OpenVINO
    accumulates MatMulInteger in float32); summed in int32 they are the same integers as one product."""
    assert integer_products._piece(512, 255) * 255 * integer_products.PLANE_SPAN < EXACT
    assert integer_products._piece(4608, 128) == 512
    spec = TrainSpec(estimator="node", m=2, last=3, forward="exact")
    pieced = compile_graph(shipped("digits_cnn/w8a8.onnx"), spec)
    monkeypatch.setattr(integer_products, "_piece", lambda k, span: k)
    whole = compile_graph(shipped("digits_cnn/w8a8.onnx"), spec)
    count = lambda c: sum(n.op_type == "Slice" and "integer_products" in n.name for n in c.train.graph.node)
    assert count(pieced) > count(whole) == 0       # fc1's K = 512 is two pieces at uint8 inputs
    x, y = models.split("digits_cnn", "target_train")
    a, b = (Steps(c)(x[:32], y[:32], 5, 0, c.contract.lr_numerator.default, dict(c.state)) for c in (pieced, whole))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
