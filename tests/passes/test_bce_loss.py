"""Binary and multi-label heads (issue #31): a Sigmoid output trains with the logistic loss (bce) on the
logit before the Sigmoid, bit for bit as the numpy reference computes it; the detector metrics (ROC AUC,
the miss rate at a fixed false-alarm rate) match a brute-force computation."""
import numpy as np
import pytest

import qdq_graphs
from fgcompile.spec import TrainSpec
from fgcompile.passes.pipeline import compile_graph
from test_step_matches_reference import run_chain
from reference import qzoff


def detector(labels: int = 1, seed: int = 0):
    """A small quantized sigmoid head: x [B, 6] -> Gemm+Relu -> MatMul+Add -> Q/DQ -> Sigmoid -> Q/DQ."""
    return qdq_graphs.dense_chain(seed, widths=(6, 8, labels), sigmoid=True)


def detection_data(labels: int = 1, n: int = 256, seed: int = 0):
    """x uniform in [-1, 1]; y = 1 where a fixed direction of x is positive (one direction per label)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 6)).astype(np.float32)
    y = (x @ rng.normal(size=(6, labels)) > 0).astype(np.int64)
    return x, (y[:, 0] if labels == 1 else y)


@pytest.mark.parametrize("labels,branches", [(1, "auto"), (1, "loop"), (3, "auto"), (3, "loop"), (1, "cloned")])
def test_bce_chain_matches_reference(labels, branches):
    spec = TrainSpec(m=4, branches=branches, last=2 if branches == "cloned" else 1)
    compiled = compile_graph(detector(labels), spec)
    assert compiled.contract.spec.loss == "bce" and compiled.contract.head == "sigmoid"
    assert compiled.contract.branches == ("stacked" if branches == "auto" else branches)
    run_chain(detector(labels), spec, detection_data(labels), steps=6)


def quantize_static_detector(tmp_path):
    """x [B, 6] -> Gemm -> Relu -> Gemm -> Sigmoid in float, quantized by onnxruntime's quantize_static (QDQ,
    uint8 activations): Q/DQ pairs around the logit and the probability, as shipped detectors have them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in (
        ("w1", rng.normal(size=(8, 6)) / 3), ("b1", np.zeros(8)), ("w2", rng.normal(size=(1, 8)) / 3), ("b2", np.zeros(1)))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["z"], transB=1), helper.make_node("Sigmoid", ["z"], ["p"])]
    graph = helper.make_graph(nodes, "detector", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "float.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": detection_data(n=64, seed=k)[0]} for k in range(4)])

        def get_next(self):
            return next(self.batches, None)
    quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(tmp_path / "q.onnx")


@pytest.mark.parametrize("branches", ["auto", "loop"])
def test_quantize_static_detector_matches_reference(tmp_path, branches):
    model = quantize_static_detector(tmp_path)
    assert [n.op_type for n in model.graph.node][-4:] == ["DequantizeLinear", "Sigmoid", "QuantizeLinear",
                                                          "DequantizeLinear"]
    spec = TrainSpec(m=4, branches=branches)
    compiled = compile_graph(model, spec)
    assert compiled.contract.loss_tap == "z" and compiled.contract.spec.loss == "bce"
    run_chain(model, spec, detection_data(), steps=6)


def test_bce_loss_pass_matches_reference_per_branch():
    """The loss pass alone: loss_plus/loss_minus of one step equal qzoff.loss on the reference's logits of
    each perturbed branch (rtol 1e-5), and accuracy is the share of z > 0 ⇔ y = 1 over branches."""
    from steps import run_step
    model, spec = detector(3), TrainSpec(m=2)
    compiled = compile_graph(model, spec)
    c = qzoff.contract(compiled.train)
    oracle = qzoff.InferenceOracle(compiled.source, c)
    x, y = detection_data(3, n=32)
    out = run_step(compiled, x, y, seed=7, step=0)
    _, diag = qzoff.step(oracle, c, dict(compiled.state), x, y, 7, 0, c["lr_numerator"]["default"])
    np.testing.assert_allclose(out["loss_plus"], diag["loss_plus"], rtol=1e-5)
    np.testing.assert_allclose(out["loss_minus"], diag["loss_minus"], rtol=1e-5)
    assert out["loss"] == pytest.approx(np.mean(np.r_[diag["loss_plus"], diag["loss_minus"]]), rel=1e-5)
    assert 0.0 < out["accuracy"] < 1.0


def test_reference_bce_is_the_logistic_loss():
    """qzoff's stable form equals −y·log σ(z) − (1 − y)·log(1 − σ(z)) where that does not overflow, and stays
    finite where it would (|z| = 100)."""
    z = np.array([[-3.0], [0.0], [2.5], [0.7]], np.float32)
    y = np.array([0, 1, 1, 0])
    p = 1 / (1 + np.exp(-z.astype(np.float64)))
    naive = -(y[:, None] * np.log(p) + (1 - y[:, None]) * np.log(1 - p)).mean()
    assert qzoff.loss(z, y, "bce") == pytest.approx(naive, rel=1e-6)
    assert qzoff.loss(np.array([[100.0], [-100.0]], np.float32), np.array([0, 1]), "bce") == pytest.approx(100.0)


def test_loss_auto_and_refusals():
    from fgcompile.errors import ModelError, SpecError
    assert compile_graph(qdq_graphs.dense_chain(0), TrainSpec(m=1)).contract.spec.loss == "ce"
    with pytest.raises(SpecError, match="--loss bce: the model's output is not a Sigmoid"):
        compile_graph(qdq_graphs.dense_chain(0), TrainSpec(m=1, loss="bce"))
    with pytest.raises(SpecError, match="--loss ce: the model's output is a Sigmoid"):
        compile_graph(detector(), TrainSpec(m=1, loss="ce"))
    with pytest.raises(ModelError, match=r"^the output has one class \('.*', \[batch, 1\]\); a detector needs"):
        compile_graph(qdq_graphs.dense_chain(0, widths=(6, 8, 1)), TrainSpec(m=1))
    from fgcompile import heads
    with pytest.raises(ModelError, match=r"Sigmoid output \(\[batch, \?\]\) has no fixed number of labels"):
        heads.check_classes("sigmoid", None)


# ----------------------------------------------------------------------------------------- metrics
def brute_auc(s, y):
    pos, neg = s[y == 1], s[y == 0]
    pairs = [(a > b) + 0.5 * (a == b) for a in pos for b in neg]
    return float(np.mean(pairs))


def brute_miss_rate(s, y, far):
    pos, neg = s[y == 1], s[y == 0]
    for t in [-np.inf] + sorted(set(s.tolist())):     # the lowest threshold whose FAR is within far
        if (neg > t).sum() / len(neg) <= far:
            return float((pos <= t).sum() / len(pos))


@pytest.mark.parametrize("seed", range(6))
def test_auc_and_miss_rate_match_brute_force(seed):
    from fgcompile.runtime import metrics
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = (rng.integers(0, 12, n) + 3 * y).astype(np.float32) / 16   # a coarse grid: many ties
    assert metrics.roc_auc(s, y) == pytest.approx(brute_auc(s, y), abs=1e-12)
    for far in (0.01, 0.05, 0.1, 0.29, 0.5, 0.99):
        assert metrics.miss_rate_at(s, y, far) == pytest.approx(brute_miss_rate(s, y, far), abs=1e-12), far


def test_detection_metrics_edge_cases():
    from fgcompile.runtime import metrics
    y = np.array([0, 0, 1, 1])
    assert metrics.roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert metrics.roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), y) == 0.5
    assert metrics.roc_auc(np.array([0.1, 0.2]), np.array([1, 1])) is None
    assert metrics.miss_rate_at(np.array([0.1, 0.2]), np.array([0, 0])) is None
    # 20 negatives at 5%: one may fire, so the threshold is the second highest negative
    neg, pos = np.linspace(0, 0.5, 20), np.array([0.3, 0.48, 0.9])   # threshold 0.47
    s, y = np.r_[neg, pos], np.r_[np.zeros(20, int), np.ones(3, int)]
    assert metrics.miss_rate_at(s, y, 0.05) == pytest.approx(1 / 3)
    # K labels: the mean over labels with both classes; a one-class label is left out
    p = np.array([[0.9, 0.2], [0.1, 0.3], [0.8, 0.6]])   # one false alarm in label 1
    r = metrics.detection(p, np.array([[1, 0], [0, 0], [1, 0]]))
    assert r["auc"] == 1.0 and r["accuracy"] == pytest.approx(5 / 6) and r["samples"] == 3


# -------------------------------------------------------------------------------------------- data
def test_data_takes_0_1_labels_for_a_sigmoid_head():
    from fgcompile.errors import DataError
    from fgcompile.runtime.data import read
    x = np.zeros((4, 6), np.float32)
    one, multi = {"x": (["batch", 6], np.float32)}, {"x": (["batch", 6], np.float32)}
    assert read((x, np.array([0, 1, 1, 0])), one, 1, "d", "sigmoid")[1].shape == (4,)
    assert read((x, np.array([[0], [1], [1], [0]])), one, 1, "d", "sigmoid")[1].shape == (4,)
    assert read((x, np.ones((4, 3), np.int64)), multi, 3, "d", "sigmoid")[1].shape == (4, 3)
    with pytest.raises(DataError, match=r"has 3 labels per example \(multi-label\); y must be \[4, 3\]"):
        read((x, np.ones((4, 2), np.int64)), multi, 3, "d", "sigmoid")
    with pytest.raises(DataError, match=r"y must be \[4, 3\]"):
        read((x, np.ones(4, np.int64)), multi, 3, "d", "sigmoid")
    with pytest.raises(DataError, match=r"labels outside \{0, 1\} \(e.g. 2\)"):
        read((x, np.array([0, 1, 2, 0])), one, 1, "d", "sigmoid")
    with pytest.raises(DataError, match="labels range over"):    # the softmax check is unchanged
        read((x, np.array([0, 1, 5, 0])), one, 5, "d")
