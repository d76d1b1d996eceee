"""The shipped zoo: every model loads in onnxruntime and reaches the accuracy its manifest records."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fgcompile import models

MAN = models.manifest()
VARIANTS = [(name, v) for name, entry in MAN["models"].items() for v in entry["variants"]]


@pytest.mark.parametrize("name,variant", VARIANTS)
def test_manifest_accuracy(name, variant):
    entry = MAN["models"][name]["variants"][variant]
    path = models.path(entry["file"])
    assert path.stat().st_size == entry["bytes"] and entry["bytes"] < 3 * 2 ** 20
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for split in ("source_test", "target_test"):
        d = np.load(models.path(MAN["data"][split]))
        acc = (sess.run(None, {"x": d["x"]})[0].argmax(1) == d["y"]).mean()
        assert abs(acc - entry[f"{split}_accuracy"]) <= 0.005, (split, acc)


@pytest.mark.parametrize("name", list(MAN["models"]))
def test_quantized_variants_have_the_promised_weights(name):
    for variant, dtype in (("w8a8", onnx.TensorProto.INT8), ("w16a8", onnx.TensorProto.INT16)):
        m = onnx.load(models.path(MAN["models"][name]["variants"][variant]["file"]))
        inits = {i.name: i.data_type for i in m.graph.initializer}
        weights = [n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear"
                   and n.input[0].endswith(".weight_quantized") and not n.input[0].startswith("ln")]
        assert weights and all(inits[w] == dtype for w in weights)


def test_default_model_has_a_last_mile_gap():
    v = MAN["models"][MAN["default"]]["variants"]["w8a8"]
    assert v["source_test_accuracy"] - v["target_test_accuracy"] >= 0.10


def test_data_files_match_the_contract():
    for split, rel in MAN["data"].items():
        d = np.load(models.path(rel))
        assert d["x"].dtype == np.float32 and d["y"].dtype == np.int64
        assert d["x"].shape[1:] == (1, 8, 8) and len(d["x"]) == len(d["y"])
