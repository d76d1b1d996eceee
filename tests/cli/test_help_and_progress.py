"""What a newcomer reads: the top-level help's command summaries, compile's notes (whitening left off),
and a log without progress frames."""
import subprocess
import sys

from click.testing import CliRunner

from conftest import MODELS
from fgcompile.cli import main


def test_top_level_help_gives_each_command_a_whole_sentence():
    out = CliRunner().invoke(main, ["--help"]).output
    rows = out.split("Commands:")[1].strip().splitlines()
    assert len(rows) == len(main.commands)
    for row in rows:
        assert row.rstrip().endswith(".") and not row.rstrip().endswith("..."), row


def test_train_writes_no_progress_frames_into_a_log(tmp_path):
    """stderr to a file (not a terminal): no carriage-return frames of the progress bar."""
    out = tmp_path / "out"
    run = lambda *a: subprocess.run([sys.executable, "-m", "fgcompile.cli", *map(str, a)], capture_output=True, text=True)
    assert run("compile", MODELS / "digits_cnn" / "w8a8.onnx", "-o", out, "--m", "2").returncode == 0
    r = run("train", out, "--data", MODELS / "data" / "digits_target_train.npz", "--epochs", "1")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "step/s" not in r.stderr


def test_compile_says_when_whitening_is_off(tmp_path):
    model, data = MODELS / "digits_cnn" / "w8a8.onnx", MODELS / "data" / "digits_target_train.npz"
    note = "note: whitening is off: --precondition auto whitens a trained Gemm/MatMul's input only with calibration"
    r = CliRunner().invoke(main, ["compile", str(model), "-o", str(tmp_path / "a")])
    assert r.exit_code == 0 and note in r.stderr and "--calibration TRAIN.npz" in r.stderr
    for extra in (["--calibration", str(data)], ["--precondition", "none"]):
        r = CliRunner().invoke(main, ["compile", str(model), "-o", str(tmp_path / "b"), "--force", *extra])
        assert r.exit_code == 0 and "whitening is off" not in r.output, extra
