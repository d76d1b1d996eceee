"""The paper's enhancements end to end through the CLI: compile, train, resume, eval and export a folder
that uses all four; the momentum buffer is training state (checkpointed) but not a model parameter."""
import json

import numpy as np
from click.testing import CliRunner

from conftest import MODELS
from fgcompile.cli import main

CNN = MODELS / "digits_cnn" / "w8a8.onnx"
TRAIN, TEST = MODELS / "data" / "digits_target_train.npz", MODELS / "data" / "digits_target_test.npz"


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    return r


def test_all_four_enhancements_train_resume_and_export(tmp_path):
    out = tmp_path / "out"
    r = run("compile", CNN, "-o", out, "--m", 4, "--kernel-norm", "--sparsity", 0.5, "--momentum", 0.25,
            "--sharpness", 8)
    assert "kernel-wise normalized ĝ; sparse update (topk): 50% of each tensor unchanged per step; " \
           "momentum-guided sampling (25% of z); sharpness-aware ascent of 8 LSB" in r.output
    before = json.loads(run("eval", out, "--data", TEST, "--json").output)["accuracy"]
    run("train", out, "--data", TRAIN, "--epochs", 1, "--quiet", "--schedule", "constant")   # constant: extends
    run("train", out, "--data", TRAIN, "--epochs", 3, "--quiet", "--resume", "--schedule", "constant")
    state = np.load(out / "checkpoint.npz")
    assert np.abs(state["fc2.weight_quantized__momentum"]).max() > 0        # the buffer carried over steps
    after = json.loads(run("eval", out, "--data", TEST, "--json").output)["accuracy"]
    assert after > before + 0.05, (before, after)
    report = json.loads(run("export", out, "-o", tmp_path / "a.onnx", "--json").output)["tensors"]
    assert sorted(report) == ["fc2.bias_quantized", "fc2.weight_quantized"]
    exported = json.loads(run("eval", tmp_path / "a.onnx", "--data", TEST, "--json").output)["accuracy"]
    assert abs(exported - after) < 0.03
