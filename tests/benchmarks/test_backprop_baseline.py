"""The torch interpreter behind the backprop baseline runs the shipped fp32 graphs as onnxruntime
does, and trains exactly the named tensors. Skipped where torch is not installed (CI installs only
.[test]; the benchmarks install .[bench])."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import backprop  # noqa: E402
from conftest import shipped  # noqa: E402
from fgcompile.session import make_session  # noqa: E402


@pytest.mark.parametrize("name", ["digits_cnn", "digits_attn"])
def test_interpreter_matches_onnxruntime(name, target_test):
    model = shipped(f"{name}/fp32.onnx")
    x = target_test[0][:100]
    expected = make_session(model).run(None, {"x": x})[0]
    with torch.no_grad():
        got = backprop.OnnxTorch(model, []).forward(torch.tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_fine_tune_moves_only_the_named_tensors_and_lowers_the_loss(target_train):
    model = shipped("digits_cnn/fp32.onnx")
    x, y = target_train
    before = backprop.OnnxTorch(model, ["fc2.weight", "fc2.bias", "fc1.weight"])
    net = backprop.fine_tune(model, ["fc2.weight", "fc2.bias"], x, y, epochs=2, batch=32, lr=3e-3)
    assert not np.array_equal(net.tensor("fc2.weight"), before.tensor("fc2.weight"))
    np.testing.assert_array_equal(net.consts["fc1.weight"].numpy(), before.tensor("fc1.weight"))
    ce = lambda n: float(torch.nn.functional.cross_entropy(n(torch.tensor(x)), torch.tensor(y)))
    with torch.no_grad():
        assert ce(net) < ce(before)


def test_unknown_op_is_named():
    model = shipped("digits_cnn/w8a8.onnx")   # QDQ ops are not in the fp32 interpreter
    with pytest.raises(NotImplementedError, match="QuantizeLinear"):
        backprop.OnnxTorch(model, [])


@pytest.mark.parametrize("name,trained", [("digits_cnn", ["fc2.weight", "fc2.bias"]),
                                          ("digits_attn", ["head.weight", "head.bias"])])
def test_the_trained_part_on_cached_frozen_values_gives_the_same_logits(name, trained, target_test):
    # fine_tune runs the frozen part once over the data and, per step, only the nodes after the trained tensors
    model = shipped(f"{name}/fp32.onnx")
    net = backprop.OnnxTorch(model, trained)
    x = torch.tensor(target_test[0][:64])
    frozen = net.frozen(x)
    assert frozen is not None and 0 < len(net.live) < len(model.graph.node) // 2
    idx = torch.tensor([5, 3, 60, 0])
    with torch.no_grad():   # equal up to float summation order (the convolutions ran on 64 examples, not 4)
        np.testing.assert_allclose(net(None, {k: v[idx] for k, v in frozen.items()}).numpy(), net(x[idx]).numpy(),
                                   rtol=1e-5, atol=1e-5)
