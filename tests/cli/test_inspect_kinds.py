"""inspect lists every parameter kind with the grid compile actually trains it on, and says which
layers stay float and why."""
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import MODELS, shipped
from fgcompile.inspection import format_inspection, inspect_graph
from fgcompile.passes.pipeline import compile_graph
from fgcompile.spec import TrainSpec

sys.path.insert(0, str(MODELS / "recipes"))
import build_dialects  # noqa: E402


@pytest.mark.parametrize("model", ["digits_cnn/w8a8.onnx", "digits_attn/w8a8.onnx", "dynamic", "qoperator"])
@pytest.mark.parametrize("bits", [8, 16])
def test_listed_grid_is_the_compiled_grid(model, bits):
    source = shipped(model) if model.endswith(".onnx") else build_dialects.build("digits_attn", model)
    rows, _ = inspect_graph(source, m=2, bits=bits)
    kinds = {(r.op, r.role) for r in rows}
    sites = sorted({r.site for r in rows})
    state = {s.name: s for s in compile_graph(source, TrainSpec(train=tuple(f"^{s}$" for s in sites), m=2,
                                                                bits=bits)).contract.state}
    assert {r.tensor for r in rows} == set(state)
    for r in rows:
        s = state[r.tensor]
        if s.float_grid is not None:
            assert r.grid.startswith("float → int32·2^") and s.stride == 4096
            assert s.float_grid == 2.0 ** int(r.grid.split("2^")[1].split(",")[0])
        else:
            assert r.grid.split(" ")[0].rstrip(",") == s.dtype
            if "stride" in r.grid:
                assert r.grid.endswith(f"stride {s.stride}")
    if "attn" in model or model in ("dynamic", "qoperator"):
        assert ("LayerNormalization", "scale") in kinds and ("MatMul", "bias") in kinds


def test_recurrent_layers_are_listed_as_float():
    """onnxruntime's quantizers leave LSTM weights float: a QDQ Gemm after an LSTM."""
    rng = np.random.default_rng(0)
    H, I = 4, 3
    inits = [numpy_helper.from_array(rng.normal(size=(1, 4 * H, I)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=(1, 4 * H, H)).astype(np.float32), "R"),
             numpy_helper.from_array(rng.integers(-50, 50, (5, H)).astype(np.int8), "Wq"),
             numpy_helper.from_array(np.float32(0.02), "s"), numpy_helper.from_array(np.int8(0), "zp"),
             numpy_helper.from_array(np.array([-1, H], np.int64), "shape")]
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["", "h"], name="lstm", hidden_size=H),
             helper.make_node("Reshape", ["h", "shape"], ["h2"], name="flat"),
             helper.make_node("DequantizeLinear", ["Wq", "s", "zp"], ["Wd"], name="dq"),
             helper.make_node("Gemm", ["h2", "Wd"], ["y"], name="head", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, "b", I])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    rows, floats = inspect_graph(m)
    assert [r.tensor for r in rows] == ["Wq"]
    assert [(f.node, f.op, f.tensors) for f in floats] == [("lstm", "LSTM", ["W", "R"])]
    table = format_inspection(rows, floats)
    assert "stays float: lstm (LSTM: W, R): recurrent weights stay float" in table
