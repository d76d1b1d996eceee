"""The backprop baseline of the detector benchmark (benchmarks/detect.py): the torch interpreter runs the
shipped Sigmoid detector as onnxruntime does, and `loss="bce"` trains the logit before the Sigmoid (the
tensor fgcompile's bce loss reads). Skipped where torch is not installed."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import backprop  # noqa: E402
from conftest import shipped  # noqa: E402
from fgcompile import models  # noqa: E402
from fgcompile.session import make_session  # noqa: E402

TRAINED = ["fc.weight", "fc.bias"]


@pytest.fixture(scope="module")
def target():
    x, y = models.split("kws_detect", "target_train")
    return x[:300], y[:300]


def test_interpreter_matches_onnxruntime_on_the_detector(target):
    model = shipped("kws_detect/fp32.onnx")
    expected = make_session(model).run(None, {"x": target[0][:64]})[0]
    with torch.no_grad():
        got = backprop.OnnxTorch(model, []).forward(torch.tensor(target[0][:64])).numpy()
    assert got.shape == (64, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_bce_fine_tune_trains_the_logit_and_lowers_the_logistic_loss(target):
    model = shipped("kws_detect/fp32.onnx")
    x, y = target
    before = backprop.OnnxTorch(model, TRAINED, output="logits")
    net = backprop.fine_tune(model, TRAINED, x, y, epochs=2, batch=32, lr=1e-2, loss="bce")
    assert net.output == "logits"   # the Sigmoid's input: the net returns logits, not probabilities
    bce = lambda n: float(torch.nn.functional.binary_cross_entropy_with_logits(
        n(torch.tensor(x))[:, 0], torch.tensor(y, dtype=torch.float32)))
    with torch.no_grad():
        assert bce(net) < bce(before)
        assert net(torch.tensor(x[:4])).abs().max() > 1.0   # a logit, beyond a probability's [0, 1]
