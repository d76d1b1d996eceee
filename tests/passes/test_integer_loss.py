"""The ce loss's decisions in integers (passes/integer_loss.py): bit for bit the reference's (qzoff.ce_*) on
every onnxruntime level and the ONNX reference evaluator, over non-finite, huge, tied and 1000-class logits;
every integer the graph makes stays below 2^24 (OpenVINO computes them in float32); and the signs are the
true ones wherever the float64 loss difference is clear of the grid. That whole steps equal the reference's
is test_step_matches_reference's, test_node_estimator's and test_head_estimator's."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx.reference import ReferenceEvaluator

from fgcompile.passes import integer_loss
from fgcompile.passes.graph_ops import Builder
from fgcompile.session import SessionSettings, make_session
from reference import qzoff

LEVELS = ["disable", "basic", "extended", "all"]


def _graph(kind: str, shape, m: int, bx: int, classes: int, loss: str = "ce") -> onnx.ModelProto:
    graph = gs.Graph(opset=18)
    z = gs.Variable("z", dtype=np.float32, shape=list(shape))
    y = gs.Variable("y", dtype=np.int64, shape=[shape[1 - bx] if kind != "error" else shape[0]])
    graph.inputs = [z, y]
    b = Builder(graph, "t")
    out = {"signs": lambda: integer_loss.example_signs(b, z, y, m, bx, classes, loss),
           "difference": lambda: integer_loss.branch_differences(b, z, y, m, bx, classes, loss),
           "error": lambda: (integer_loss.softmax_error if loss == "ce" else integer_loss.sigmoid_error)(b, z, y)}[kind]()
    out.shape = [None] * (1 if kind == "difference" else 2)
    graph.outputs = [out]
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _logits(rng, n: int, batch: int, classes: int) -> np.ndarray:
    """Branches that differ a little (as ± perturbations do), with the hard cases mixed in."""
    z = (rng.normal(0, 4, (1, batch, classes)) + rng.normal(0, 0.01, (n, batch, classes))).astype(np.float32)
    z[:, 0] = z[0, 0]                                    # a tie: both branches equal
    z[1, 1, 0] = np.nan                                  # a broken branch
    z[0, 2, -1] = np.inf
    z[:, 3] *= 1e5                                       # far beyond the grid's clip
    z[:, 4, 0] = z[:, 4, -1]                             # two classes equal (or one class)
    z[:, 5] = 0                                          # every class equal
    return z


def _expected(kind: str, z: np.ndarray, y: np.ndarray, m: int, loss: str = "ce") -> np.ndarray:
    if kind == "signs":
        signs = qzoff.ce_example_signs if loss == "ce" else qzoff.bce_example_signs
        return np.stack([signs(z[i], z[m + i], y) for i in range(m)])
    if kind == "difference":
        return np.array([qzoff.branch_difference(z[i], z[m + i], y, loss) for i in range(m)])
    return (qzoff.ce_error if loss == "ce" else qzoff.bce_error)(z[0], y)


def _runs(model: onnx.ModelProto, feeds: dict):
    for level in LEVELS:
        yield level, make_session(model, 1, SessionSettings(optimization=level)).run(None, feeds)[0]
    yield "reference evaluator", ReferenceEvaluator(model).run(None, feeds)[0]


@pytest.mark.parametrize("kind", ["signs", "difference", "error"])
@pytest.mark.parametrize("classes,bx,loss", [(10, 0, "ce"), (10, 1, "ce"), (2, 0, "ce"), (1000, 0, "ce"),
                                             (1, 0, "bce"), (1, 1, "bce")])
def test_decisions_match_the_reference_everywhere(kind, classes, bx, loss):
    rng = np.random.default_rng(classes + bx)
    m, batch = 3, 9
    z = _logits(rng, 2 * m, batch, classes)
    y = rng.integers(0, max(classes, 2), batch).astype(np.int64)
    expected = _expected(kind, z, y, m, loss)
    feed = z if bx == 0 or kind == "error" else z.transpose(1, 0, 2)
    feed = feed[0] if kind == "error" else feed
    shape = feed.shape
    model = _graph(kind, shape, m, bx, classes, loss)
    for where, got in _runs(model, {"z": np.ascontiguousarray(feed), "y": y}):
        np.testing.assert_array_equal(got, expected, err_msg=where)
    if kind == "signs":
        assert (expected[:, 0] == 0).all() and expected[1, 1] == 0 and expected[0, 2] == 0   # ties, non-finite: 0
    if kind == "difference":
        assert expected[1] == 0 and expected[0] == 0                                         # a non-finite pair: 0
    if kind == "error" and loss == "ce":
        assert (expected[2] == 0).all() and (expected[5] != 0).any()
    if loss == "bce" and kind == "signs":      # the detector's sign follows z's order, turned by the label
        assert (expected[:, 6:] != 0).all()


@pytest.mark.parametrize("classes,batch,loss", [(2 ** 14, 8, "ce"), (16, 2047, "ce"), (1, 2047, "bce")])
def test_every_integer_stays_below_2_24(classes, batch, loss):
    """Every int32 tensor the decisions make, on logits beyond the grid's clip, at the most classes and at
    the largest batch the branch sums are exact for."""
    m = 1
    rng = np.random.default_rng(0)
    z = rng.choice([-1e9, 1e9, 0.0], (2 * m, batch, classes)).astype(np.float32)
    y = rng.integers(0, max(classes, 2), batch).astype(np.int64)
    for kind in ("signs", "difference", "error"):
        model = _graph(kind, z.shape if kind != "error" else z.shape[1:], m, 0, classes, loss)
        ints = [v.name for v in onnx.shape_inference.infer_shapes(model).graph.value_info
                if v.type.tensor_type.elem_type == onnx.TensorProto.INT32]
        for name in ints:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT32, None))
        feeds = {"z": z if kind != "error" else z[0], "y": y}
        outs = make_session(model, 1, SessionSettings(optimization="disable")).run(None, feeds)
        assert len(outs) > 3
        for name, value in zip([o.name for o in model.graph.output], outs):
            if value.dtype == np.int32:
                assert np.abs(value.astype(np.int64)).max() < 2 ** 24, (kind, name)


def _true_losses(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    top = z.max(-1, keepdims=True)
    return (top[..., 0] + np.log(np.exp(z - top).sum(-1))) - z[np.arange(len(y)), y]


def test_signs_are_the_true_ones_where_the_difference_is_clear():
    """Where the float64 loss difference is larger than the grid can blur, the integer sign is its sign: each
    loss moves by at most 2^-G (the logit rounding of q_c − q_y) plus the tables' roundings (~2.5e-4), so a
    difference by 3e-3 per example, 3e-3·B over the batch."""
    rng = np.random.default_rng(1)
    classes, batch = 10, 64
    base = rng.normal(0, 3, (batch, classes))
    agree_examples, agree_branches = [], []
    for _ in range(50):
        zp = (base + rng.normal(0, 0.05, base.shape)).astype(np.float32)
        zm = (base + rng.normal(0, 0.05, base.shape)).astype(np.float32)
        y = rng.integers(0, classes, batch)
        d = _true_losses(zp, y) - _true_losses(zm, y)
        s = qzoff.ce_example_signs(zp, zm, y)
        clear = np.abs(d) > 3e-3
        agree_examples.append((s[clear] == np.sign(d[clear])).all())
        total = d.sum()
        if abs(total) > 3e-3 * batch:
            agree_branches.append(np.sign(qzoff.branch_difference(zp, zm, y)) == np.sign(total))
    assert all(agree_examples) and len(agree_branches) > 20 and all(agree_branches)


def test_the_error_is_softmax_minus_onehot_on_2_7():
    """V within one step of round(128·(softmax − onehot)), and equal wherever that is not within 1/64 of a
    half (the grid's rounding of the logits moves it by less)."""
    rng = np.random.default_rng(2)
    z = rng.normal(0, 3, (256, 10)).astype(np.float32)
    y = rng.integers(0, 10, 256)
    p = np.exp(z.astype(np.float64) - z.max(-1, keepdims=True))
    e = 128 * (p / p.sum(-1, keepdims=True) - np.eye(10)[y])
    v = qzoff.ce_error(z, y)
    assert np.abs(v - np.clip(np.floor(e + 0.5), -128, 127)).max() <= 1
    clear = np.abs(e - np.floor(e) - 0.5) > 1 / 64
    np.testing.assert_array_equal(v[clear], np.clip(np.floor(e + 0.5), -128, 127)[clear])
