"""The bad-input catalogue: each entry gives its clear error (exit 2, no traceback) and leaves no output."""
import os
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import qdq_graphs
from qdq_graphs import qdq_model
from conftest import MODELS
from fgcompile.cli import main

CNN = MODELS / "digits_cnn" / "w8a8.onnx"
TRAIN = MODELS / "data" / "digits_target_train.npz"


def with_opset(version):
    m = onnx.load(CNN)
    m.opset_import[0].version = version
    return m


def external_data_missing(tmp):
    onnx.save(onnx.load(CNN), tmp / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    os.remove(tmp / "ext.data")
    return tmp / "ext.onnx"


def model_file(build):
    def make(tmp):
        p = tmp / "model.onnx"
        obj = build(tmp) if callable(build) else build
        if isinstance(obj, bytes):
            p.write_bytes(obj)
        elif isinstance(obj, onnx.ModelProto):
            onnx.save(obj, p)
        else:
            return obj
        return p
    return make


COMPILE_CASES = {
    "non-ONNX bytes": (model_file(b"\x89PNG this is not a model"), [], "not a readable ONNX model"),
    "truncated ONNX": (model_file(lambda t: CNN.read_bytes()[:20000]), [], "truncated"),
    "float model": (model_file(lambda t: onnx.load(MODELS / "digits_cnn" / "fp32.onnx")), [], "not quantized"),
    "no weight sites": (model_file(lambda t: qdq_model(consumer="Add")), [], "no weight sites"),
    "unsupported op on trained path": (model_file(lambda t: qdq_model(extra_after="Dropout")), [],
                                       "'bad_node' (Dropout) lies on the trained path"),
    "tensor feeding two consumers": (model_file(lambda t: qdq_model(tie=True)), [], "'W' is shared by 2 nodes"),
    "opset too old": (model_file(lambda t: with_opset(10)), [], "opset 10; QDQ quantization needs opset >= 13"),
    "opset too new": (model_file(lambda t: with_opset(30)), [], "opset 30, newer than"),
    "external data missing": (model_file(external_data_missing), [], "external data that is missing"),
    "eps too large": (model_file(lambda t: onnx.load(CNN)), ["--eps", "5000"], "--eps 5000"),
    "lr would overflow": (model_file(lambda t: onnx.load(CNN)),
                          ["--lr", "4000", "--m", "64", "--perturbation", "gaussian", "--estimator", "spsa"],
                          "would overflow int32"),
    "lr below resolution": (model_file(lambda t: onnx.load(CNN)), ["--lr", "0.001"], "fixed-point resolution"),
    "train pattern matches nothing": (model_file(lambda t: onnx.load(CNN)), ["--train", "^nothing$"],
                                      "matches no weight site"),
}


def leftovers(tmp, before):
    return sorted(set(os.listdir(tmp)) - before)


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_compile_catalogue(tmp_path, case):
    make, args, message = COMPILE_CASES[case]
    model = make(tmp_path)
    before = set(os.listdir(tmp_path))
    r = CliRunner().invoke(main, ["compile", str(model), "-o", str(tmp_path / "out"), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert leftovers(tmp_path, before) == []


def test_output_directory_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    before = set(os.listdir(tmp_path))
    r = CliRunner().invoke(main, ["compile", str(CNN), "-o", str(blocker / "out")])
    assert r.exit_code == 2 and "cannot write here" in r.output
    assert leftovers(tmp_path, before) == []


def test_failed_recompile_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["compile", str(CNN), "-o", str(out)]).exit_code == 0
    snapshot = {p: (out / p).read_bytes() for p in os.listdir(out)}
    r = CliRunner().invoke(main, ["compile", str(CNN), "-o", str(out), "--train", "nope"])
    assert r.exit_code == 2
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == snapshot


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "out"
    assert CliRunner().invoke(main, ["compile", str(CNN), "-o", str(out)]).exit_code == 0
    return out


DATA_CASES = {
    "wrong shape": (dict(x=np.zeros((4, 8, 8), np.float32), y=np.zeros(4, np.int64)), "model input is"),
    "wrong dtype": (dict(x=np.zeros((4, 1, 8, 8), np.int16), y=np.zeros(4, np.int64)), "x has dtype int16"),
    "missing y": (dict(x=np.zeros((4, 1, 8, 8), np.float32)), "missing array 'y'"),
    "labels out of range": (dict(x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 3, 11, 2])), "labels range"),
    "NaN": (dict(x=np.full((4, 1, 8, 8), np.nan, np.float32), y=np.zeros(4, np.int64)), "NaN or Inf"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_train_data_catalogue(tmp_path, compiled, case):
    arrays, message = DATA_CASES[case]
    out = tmp_path / "out"
    shutil.copytree(compiled, out)
    np.savez(tmp_path / "bad.npz", **arrays)
    r = CliRunner().invoke(main, ["train", str(out), "--data", str(tmp_path / "bad.npz"), "--quiet"])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert sorted(os.listdir(out)) == sorted(os.listdir(compiled))  # no checkpoint, no log


def test_fixed_batch_model_with_another_batch(tmp_path):
    model = qdq_graphs.dense_chain(3, widths=(64, 10), batch=4)
    x = np.random.default_rng(0).uniform(0, 1, (12, 64)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(12) % 10)
    onnx.save(model, tmp_path / "m.onnx")
    assert CliRunner().invoke(main, ["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o")]).exit_code == 0
    r = CliRunner().invoke(main, ["train", str(tmp_path / "o"), "--data", str(tmp_path / "d.npz"), "--quiet"])
    assert r.exit_code == 2 and "fixed at 4. Pass --batch 4" in r.output
    r = CliRunner().invoke(main, ["train", str(tmp_path / "o"), "--data", str(tmp_path / "d.npz"), "--batch", "4",
                                  "--quiet", "--epochs", "1"])
    assert r.exit_code == 0, r.output
