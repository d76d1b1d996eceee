import pathlib
import sys

import numpy as np
import pytest

from fgcompile import models
from fgcompile.modelio import load_model

MODELS = models.ROOT
BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))   # the benchmark modules are scripts, not an installed package


def pytest_configure(config):
    # also outside the checkout (CI's wheel job), where pyproject's marker list is not read
    config.addinivalue_line("markers", "slow: rebuilds and heavy measurements; deselected by default")
    config.addinivalue_line("markers", "cdriver: the example C driver (examples/c); skipped without cc and onnxruntime's "
                                       "C headers (.ci/c-driver installs them)")


@pytest.fixture(scope="session")
def target_train():
    d = np.load(MODELS / "data" / "digits_target_train.npz")
    return d["x"], d["y"]


@pytest.fixture(scope="session")
def target_test():
    d = np.load(MODELS / "data" / "digits_target_test.npz")
    return d["x"], d["y"]


def shipped(name: str):
    return load_model(MODELS / name)


@pytest.fixture
def tmp_out(tmp_path) -> pathlib.Path:
    return tmp_path / "out"


def int8_kernels_saturate() -> bool:
    """Whether onnxruntime's uint8 × int8 kernels saturate on this CPU (x86 without AVX-VNNI: byte-product pairs
    summed in int16), so its fused int8 kernels do not compute a quantized model's ONNX arithmetic."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    a, w = np.full((1, 2), 255, np.uint8), np.full((2, 1), 127, np.int8)
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return int(sess.run(None, {"a": a})[0][0, 0]) != 2 * 255 * 127
