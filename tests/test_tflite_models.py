"""The shipped TFLite-origin int8 models (models/recipes/build_tflite.py): they load in onnxruntime, hold
TFLite's signed int8 activations and int8 weights as tf2onnx writes them, reach the accuracies the
manifest records, and run fgcompile's workflow with the defaults."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import fgcompile
from fgcompile import models
from fgcompile.cli import main
from fgcompile.runtime.data import load_data
from fgcompile.session import make_session

TFLITE = models.manifest()["tflite"]["models"]
DETECTOR = "kws_detect_int8"


def data(name: str, split: str, tmp_path=None) -> tuple[np.ndarray, np.ndarray]:
    """The model's split; the detector's labels are 1 for its keyword, 0 for the other words (written to
    tmp_path as an .npz when given, for the CLI)."""
    entry = TFLITE[name]
    x, y = load_data(models.path(entry["data"][split]))
    if "keyword" in entry:
        y = (y == entry["keyword"]).astype(np.int64)
    if tmp_path is not None:
        np.savez(tmp_path / f"{split}.npz", x=x, y=y)
    return x, y


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def auc(score: np.ndarray, y: np.ndarray) -> float:
    pos, neg = score[y == 1], score[y == 0]
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


@pytest.mark.parametrize("name", list(TFLITE))
def test_recorded_accuracy_in_onnxruntime(name):
    """The recipe recorded onnxruntime's accuracy next to the TFLite interpreter's on the same inputs."""
    entry = TFLITE[name]
    path = models.path(entry["file"])
    assert path.stat().st_size == entry["bytes"] < 200_000
    sess = make_session(str(path))
    for split in ("source_test", "target_test"):
        x, y = data(name, split)
        out = sess.run(None, {"x": x})[0]
        if name == DETECTOR:
            assert out.shape == (len(x), 1) and ((out >= 0) & (out <= 1)).all()
            assert abs(((out[:, 0] >= 0.5) == y).mean() - entry[f"{split}_accuracy"]) <= 0.005
            assert abs(auc(out[:, 0], y) - entry[f"{split}_auc"]) <= 0.005
        else:
            assert abs((out.argmax(1) == y).mean() - entry[f"{split}_accuracy"]) <= 0.005
        assert abs(entry[f"{split}_accuracy"] - entry[f"{split}_tflite_accuracy"]) <= 0.01, split
    assert entry["source_test_accuracy"] >= 0.9


@pytest.mark.parametrize("name", list(TFLITE))
def test_tflite_quantization_as_tf2onnx_writes_it(name):
    """int8 weights through DequantizeLinear; every activation int8 with TFLite's zero points (-128 after
    a Relu); Transpose and Reshape move int8 tensors between a QuantizeLinear and a DequantizeLinear."""
    m = onnx.load(models.path(TFLITE[name]["file"]))
    assert {o.version for o in m.opset_import if o.domain in ("", "ai.onnx")} == {21}
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    weights = [inits[n.input[0]] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].ndim >= 2]
    assert weights and all(w.dtype == np.int8 for w in weights)
    zero_points = [inits[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 for z in zero_points) and -128 in np.concatenate(
        [z.ravel() for z in zero_points])
    moves = [n for n in m.graph.node if n.op_type in ("Transpose", "Reshape")]
    assert moves and all(producer[n.input[0]].op_type in ("QuantizeLinear", "Transpose", "Reshape") for n in moves)


def test_digits_eval_reaches_the_recorded_accuracy(tmp_path):
    entry = TFLITE["digits_int8"]
    for split in ("source_test", "target_test"):
        data("digits_int8", split, tmp_path)
        r = run("eval", models.path(entry["file"]), "--data", tmp_path / f"{split}.npz", "--json")
        assert r.exit_code == 0, r.output
        assert abs(json.loads(r.stdout)["accuracy"] - entry[f"{split}_accuracy"]) <= 0.005


def test_detector_eval_reaches_the_recorded_auc(tmp_path):
    """AUC is threshold-free; accuracy may differ by the clips whose 8-bit probability is exactly 0.5
    (fgcompile counts p > 0.5 as the keyword, as its in-graph logit > 0; the recipe counted p >= 0.5)."""
    entry = TFLITE[DETECTOR]
    for split in ("source_test", "target_test"):
        data(DETECTOR, split, tmp_path)
        r = run("eval", models.path(entry["file"]), "--data", tmp_path / f"{split}.npz", "--json")
        assert r.exit_code == 0, r.output
        result = json.loads(r.stdout)
        assert abs(result["auc"] - entry[f"{split}_auc"]) <= 0.005
        assert abs(result["accuracy"] - entry[f"{split}_accuracy"]) <= 0.01


def workflow(name: str, tmp_path) -> dict:
    """compile, train one epoch on the target train split, verify, export, eval the export on target
    test, all with the defaults; returns eval's record of the exported model on target test."""
    out = tmp_path / "out"
    for split in ("target_train", "target_test"):
        data(name, split, tmp_path)
    steps = [("compile", models.path(TFLITE[name]["file"]), "-o", out),
             ("train", out, "--data", tmp_path / "target_train.npz", "--epochs", 1, "--quiet", "--threads", 1),
             ("verify", out, "--steps", 2),
             ("export", out, "-o", tmp_path / "adapted.onnx")]
    for args in steps:
        r = run(*args)
        assert r.exit_code == 0, (args[0], r.output)
    r = run("eval", tmp_path / "adapted.onnx", "--data", tmp_path / "target_test.npz", "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_digits_workflow_with_the_defaults(tmp_path):
    assert workflow("digits_int8", tmp_path)["accuracy"] > TFLITE["digits_int8"]["target_test_accuracy"]


def test_detector_workflow_with_the_defaults(tmp_path):
    assert workflow(DETECTOR, tmp_path)["auc"] > TFLITE[DETECTOR]["target_test_auc"]


def test_a_zero_point_shared_by_widened_weights_stays_one_constant(capfd):
    """tf2onnx shares one zero-point initializer between layers: widening them all must not make a
    second constant of the same name per weight (onnx-graphsurgeon printed 7,394 warnings for --last 8)."""
    compiled = fgcompile.compile_model(models.path(TFLITE[DETECTOR]["file"]), fgcompile.TrainSpec(m=2, last=8, estimator="sign"))
    out, err = capfd.readouterr()
    assert "share the same name" not in out + err
    names = [i.name for i in compiled.train.graph.initializer]
    assert len(names) == len(set(names))
