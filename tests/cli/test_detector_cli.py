"""A detector end to end on the command line (issue #31): a quantized Sigmoid output compiles with the
default --loss (bce), trains on 0/1 labels (the loss goes down), exports, and eval/tune judge it by ROC
AUC and the miss rate at a false-alarm rate; the new option and labels have their bad-input cases."""
import json
import statistics

import numpy as np
import onnx
import pytest

import qdq_graphs
from test_bad_input_catalogue import invoke, refused, snapshot


def detector(labels=1):
    return qdq_graphs.dense_chain(0, widths=(6, 8, labels), sigmoid=True)


def data(labels=1, n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 6)).astype(np.float32)
    y = (x @ np.random.default_rng(1).normal(size=(6, labels)) > 0).astype(np.int64)
    return x, (y[:, 0] if labels == 1 else y)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{name: path}: the detector and a 3-label head with their data, a one-class softmax model and a
    two-class one."""
    tmp = tmp_path_factory.mktemp("detector")
    paths = {}
    for name, model in (("detector", detector()), ("multi", detector(3)),
                        ("one_class", qdq_graphs.dense_chain(0, widths=(6, 8, 1))),
                        ("softmax", qdq_graphs.dense_chain(0, widths=(6, 8, 2)))):
        onnx.save(model, tmp / f"{name}.onnx")
        paths[name] = tmp / f"{name}.onnx"
    for name, labels, seed in (("train", 1, 0), ("val", 1, 5), ("multi_train", 3, 0)):
        x, y = data(labels, seed=seed)
        np.savez(tmp / f"{name}.npz", x=x, y=y)
        paths[name] = tmp / f"{name}.npz"
    return paths


@pytest.fixture(scope="module")
def compiled(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "out"
    r = invoke("compile", files["detector"], "-o", out, "--m", 8)
    assert r.exit_code == 0 and "loss=bce on" in r.output, r.output
    return out


def test_compile_train_export_eval(files, compiled, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(compiled, out)
    contract = json.loads(invoke("compile", files["detector"], "-o", tmp_path / "again", "--m", 8,
                                 "--json").output)["contract"]
    assert contract["head"] == "sigmoid" and contract["spec"]["loss"] == "bce"
    before = json.loads(invoke("eval", out, "--data", files["val"], "--json").output)
    r = invoke("train", out, "--data", files["train"], "--val", files["val"], "--epochs", 12, "--lr", 256, "--quiet",
               "--json")
    assert r.exit_code == 0, r.output
    history = json.loads(r.output)["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert {"val_auc", "val_miss_rate"} <= set(history[-1])
    after = json.loads(invoke("eval", out, "--data", files["val"], "--json", "--false-alarm", "0.1").output)
    # the random head starts below chance (AUC 0.20 on these labels) and learns them
    assert after["loss"] < before["loss"] and before["auc"] < 0.5 < 0.8 < after["auc"]
    assert after["miss_rate"] < before["miss_rate"] and after["false_alarm"] == 0.1
    assert invoke("export", out, "-o", tmp_path / "adapted.onnx").exit_code == 0
    r = invoke("eval", tmp_path / "adapted.onnx", "--data", files["val"])
    assert r.exit_code == 0 and "AUC 0." in r.output and "at false-alarm rate 0.05" in r.output, r.output
    exported = json.loads(invoke("eval", tmp_path / "adapted.onnx", "--data", files["val"], "--json").output)
    assert exported["auc"] == pytest.approx(after["auc"], abs=0.05) and 0 <= exported["miss_rate"] < 1


def test_multi_label_head_trains_on_n_by_k_labels(files, tmp_path):
    out = tmp_path / "multi"
    assert invoke("compile", files["multi"], "-o", out, "--m", 4).exit_code == 0
    r = invoke("train", out, "--data", files["multi_train"], "--epochs", 2, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    r = json.loads(invoke("eval", out, "--data", files["multi_train"], "--json").output)
    assert r["samples"] == 256 and 0 <= r["auc"] <= 1


def test_tune_scores_a_detector_by_auc(files, compiled, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(compiled, out)
    r = invoke("tune", out, "--data", files["train"], "--epochs", 1, "--folds", 2, "--json")
    assert r.exit_code == 0, r.output
    record = json.loads(r.output)
    best = max(record["scores"], key=lambda s: (s["val_auc"], -s["val_loss"], -s["lr"]))
    assert record["choice"]["lr"] == best["lr"]
    assert all({"val_auc", "val_miss_rate"} <= set(run) for s in record["scores"] for run in s["runs"])
    for s in record["scores"]:   # each rate's miss rate is the mean of its trials'
        assert s["val_miss_rate"] == statistics.mean(run["val_miss_rate"] for run in s["runs"])


# ------------------------------------------------------------------------------------ bad input
def test_one_class_softmax_output_is_refused(files, tmp_path):
    before = snapshot(files["one_class"].parent)
    refused(invoke("compile", files["one_class"], "-o", tmp_path / "o"), "error: the output has one class")
    refused(invoke("eval", files["one_class"], "--data", files["train"]), "error: the output has one class")
    assert not (tmp_path / "o").exists() and snapshot(files["one_class"].parent) == before


def test_loss_bce_on_a_softmax_model_is_refused(files, tmp_path):
    refused(invoke("compile", files["softmax"], "-o", tmp_path / "o", "--loss", "bce"),
            "--loss bce: the model's output is not a Sigmoid")
    refused(invoke("compile", files["detector"], "-o", tmp_path / "o", "--loss", "ce"),
            "--loss ce: the model's output is a Sigmoid")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1", "nan"])
def test_false_alarm_outside_0_1(files, compiled, value):
    kept = snapshot(compiled)
    refused(invoke("eval", compiled, "--data", files["val"], "--false-alarm", value), f"--false-alarm {value}")
    assert snapshot(compiled) == kept


LABEL_CASES = {
    "labels outside 0/1": ("detector", lambda n: np.arange(n) % 3, "labels outside {0, 1} (e.g. 2)"),
    "multi-label y for a detector": ("detector", lambda n: np.zeros((n, 2), np.int64),
                                     "has one label per example; y must be"),
    "multi-label y of the wrong width": ("multi", lambda n: np.zeros((n, 2), np.int64),
                                         "has 3 labels per example (multi-label); y must be [256, 3]"),
    "class indices for a multi-label head": ("multi", lambda n: np.zeros(n, np.int64), "y must be [256, 3]"),
    "float labels": ("detector", lambda n: np.full(n, 0.5, np.float32), "labels must be integer 0/1 labels"),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_bad_labels(files, tmp_path, case):
    model, make, message = LABEL_CASES[case]
    out = tmp_path / "out"
    assert invoke("compile", files[model], "-o", out, "--m", 2).exit_code == 0
    x = data(3 if model == "multi" else 1)[0]
    np.savez(tmp_path / "bad.npz", x=x, y=make(len(x)))
    kept = snapshot(tmp_path)
    for command in (("train", out, "--data", tmp_path / "bad.npz", "--quiet"),
                    ("eval", out, "--data", tmp_path / "bad.npz")):
        refused(invoke(*command), message)
    assert snapshot(tmp_path) == kept       # no checkpoint, no log
