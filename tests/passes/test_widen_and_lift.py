"""Widening int8 -> int16 and lifting to state inputs keep the model's function bit for bit."""
import numpy as np
import onnxruntime as ort
import pytest

from conftest import shipped
from fgcompile.passes.pipeline import compile_graph
from fgcompile.spec import TrainSpec


@pytest.mark.parametrize("model_file", ["digits_cnn/w8a8.onnx", "digits_attn/w8a8.onnx", "digits_cnn/w16a8.onnx"])
@pytest.mark.parametrize("bits", [8, 16])
def test_eval_graph_equals_source(model_file, bits, target_test):
    source = shipped(model_file)
    compiled = compile_graph(source, TrainSpec(bits=bits, last=2))
    x = target_test[0]
    want = ort.InferenceSession(source.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(compiled.eval.SerializeToString()).run(None, {"x": x, **compiled.state})[0]
    np.testing.assert_array_equal(got, want)
    for s in compiled.contract["state"]:
        if s["widened"] and s["role"] == "weight":
            assert compiled.state[s["name"]].dtype == np.int16
            assert not (compiled.state[s["name"]].astype(np.int64) % 256).any()
