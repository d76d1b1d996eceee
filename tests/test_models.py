"""The shipped zoo: every model loads in onnxruntime and reaches the accuracy its manifest records."""
import numpy as np
import onnx
import pytest

from fgcompile import models
from fgcompile.runtime.data import load_data
from fgcompile.runtime.metrics import detection
from fgcompile.session import make_session

MAN = models.manifest()
KWS_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")   # kws_data.WORDS
VARIANTS = [(name, v) for name, entry in MAN["models"].items() for v in entry["variants"]]


def splits(name: str) -> dict:
    """A model's data files: its own `splits` (kws_dscnn), else the manifest's default `data` (digits)."""
    return MAN["models"][name].get("splits", MAN["data"])


@pytest.mark.parametrize("name,variant", VARIANTS)
def test_manifest_accuracy(name, variant):
    entry = MAN["models"][name]["variants"][variant]
    path = models.path(entry["file"])
    assert path.stat().st_size == entry["bytes"] and entry["bytes"] < 3 * 2 ** 20
    sess = make_session(str(path), arithmetic=True)   # as ONNX defines it, as `fgcompile eval` scores it
    for split in ("source_test", "target_test"):
        x, y = models.split(name, split)
        out = sess.run(None, {"x": x})[0]
        if "keyword" in MAN["models"][name]:   # a detector: also its ROC AUC and miss rate at 5% false alarms
            got = detection(out, y, MAN["models"][name]["false_alarm"])
            assert abs(got["auc"] - entry[f"{split}_auc"]) <= 0.002, (split, got)
            assert abs(got["miss_rate"] - entry[f"{split}_miss_rate"]) <= 0.01, (split, got)
            acc = got["accuracy"]
        else:
            acc = (out.argmax(1) == y).mean()
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


def test_kws_model_has_a_device_gap():
    """The issue's bar for the keyword-spotting task: >= 20 points lost to the target microphone."""
    v = MAN["models"]["kws_dscnn"]["variants"]["w8a8"]
    assert v["source_test_accuracy"] >= 0.90 and v["source_test_accuracy"] - v["target_test_accuracy"] >= 0.20


def test_kws_detector_has_a_device_gap():
    """The detector demo's room to improve: near perfect on clean speech, and through the target microphone
    a miss rate at 5% false alarms that halving can measure (>= 15%)."""
    entry = MAN["models"]["kws_detect"]
    v = entry["variants"]["w8a8"]
    assert entry["keyword"]["word"] == KWS_WORDS[entry["keyword"]["class"]] and entry["false_alarm"] == 0.05
    assert v["source_test_auc"] >= 0.99 and v["source_test_miss_rate"] <= 0.05
    assert v["target_test_auc"] <= 0.97 and v["target_test_miss_rate"] >= 0.15


def test_keyword_vs_rest_marks_exactly_the_keyword():
    y = np.array([2, 0, 9, 2, 5, 2])
    assert models.keyword_vs_rest(y, 2).tolist() == [1, 0, 0, 1, 0, 1]
    assert models.keyword_vs_rest(y, 2).dtype == np.int64 and not models.keyword_vs_rest(y, 7).any()
    with pytest.raises(ValueError, match="integer class labels"):
        models.keyword_vs_rest(np.array([0.0, 2.0]), 2)


def test_detector_splits_are_the_ten_word_files_relabelled():
    """models.split relabels kws_detect's splits keyword-vs-rest: the same clips as kws_dscnn's, one word
    (10% of each split) positive."""
    k = MAN["models"]["kws_detect"]["keyword"]["class"]
    for split in ("target_train", "target_test"):
        (x, y), (x10, y10) = models.split("kws_detect", split), models.split("kws_dscnn", split)
        assert np.array_equal(x, x10) and np.array_equal(y, (y10 == k).astype(np.int64))
        assert 0.05 <= y.mean() <= 0.15, (split, y.mean())


@pytest.mark.parametrize("name", list(MAN["models"]))
def test_data_files_match_the_contract(name):
    """Each model's splits load as float32 inputs shaped like its input, with labels in its 10 classes."""
    shape = [d.dim_value for d in onnx.load(models.path(MAN["models"][name]["variants"]["fp32"]["file"]))
             .graph.input[0].type.tensor_type.shape.dim]
    for split, rel in splits(name).items():
        x, y = load_data(models.path(rel), ["batch", *shape[1:]], 10)
        assert x.dtype == np.float32 and y.dtype == np.int64 and len(x) == len(y)
        assert np.bincount(y, minlength=10).min() > 0, split
