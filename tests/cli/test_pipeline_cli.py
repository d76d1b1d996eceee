"""What pipelines read: --json on compile/train/eval/export, a TOML --config that flags override,
-o/--out on export (--output kept as a hidden alias), session options, --log-level."""
import json
import logging

import pytest
from click.testing import CliRunner

from conftest import MODELS
from fgcompile.cli import main

CNN = MODELS / "digits_cnn" / "w8a8.onnx"
DATA = MODELS / "data" / "digits_target_train.npz"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


@pytest.fixture(autouse=True)
def _reset_logging():
    yield
    logging.getLogger().handlers.clear()      # --log-level configures the root logger once per process


def test_config_file_then_flags_override(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[compile]\nm = 3\nbits = 8\ntrain = ["fc2"]\nno-bias = true\n'
                   f'[train]\ndata = "{DATA}"\nepochs = 1\nbatch = 50\nquiet = true\n')
    r = run("compile", CNN, "-o", tmp_path / "out", "--config", cfg, "--m", 2, "--json")
    assert r.exit_code == 0, r.output
    c = json.loads(r.stdout)["contract"]
    assert c["spec"]["m"] == 2 and c["spec"]["bits"] == 8 and not c["spec"]["include_bias"]
    assert [s["name"] for s in c["state"]] == ["fc2.weight_quantized"] and c["stream"] == "fgc-int32/2"

    r = run("train", tmp_path / "out", "--config", cfg, "--epochs", 2, "--threads", 1, "--optimization", "disable",
            "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["step"] == 2 * (500 // 50) and [h["epoch"] for h in result["history"]] == [1, 2]

    r = run("eval", tmp_path / "out", "--data", DATA, "--json", "--optimization", "basic")
    assert r.exit_code == 0 and json.loads(r.stdout)["samples"] == 500

    r = run("export", tmp_path / "out", "-o", tmp_path / "a.onnx", "--json")
    assert r.exit_code == 0 and set(json.loads(r.stdout)["tensors"]) == {s["name"] for s in c["state"]}
    r = run("export", tmp_path / "out", "--output", tmp_path / "b.onnx")          # the old flag still works
    assert r.exit_code == 0 and (tmp_path / "b.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()


def test_config_errors_name_the_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[compile]\nmm = 3\n")
    r = run("compile", CNN, "-o", tmp_path / "out", "--config", cfg)
    assert r.exit_code == 2 and "has no option 'mm'" in r.output and not (tmp_path / "out").exists()
    cfg.write_text("[compile\n")
    r = run("compile", CNN, "-o", tmp_path / "out", "--config", cfg)
    assert r.exit_code == 2 and "not valid TOML" in r.output


def test_session_and_log_options(tmp_path):
    r = run("eval", CNN, "--data", DATA, "--provider", "NoSuchExecutionProvider")
    assert r.exit_code == 2 and "Available: " in r.output
    r = run("--log-level", "info", "compile", CNN, "-o", tmp_path / "out")
    assert r.exit_code == 0 and "INFO fgcompile.compile: compiled" in r.output   # stderr (mixed in by click < 8.2)
    r = run("export", tmp_path / "out")
    assert r.exit_code == 2 and "'-o' / '--out'" in r.output
