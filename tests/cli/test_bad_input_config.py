"""Bad input through --config, unbounded --threads / verify --steps, --json on errors, the Python API's
argument types and --log-level after the command (issue #27).

Every refusal exits 2 with one paragraph that names the problem and the fix, shows no traceback and
leaves the user's files as they were."""
import json
import os
import resource
import subprocess
import sys
import threading

import numpy as np
import pytest
from click.testing import CliRunner

import fgcompile
from conftest import MODELS
from fgcompile.cli import main
from fgcompile.errors import DataError, FgcompileError, ModelError, SpecError

CNN = MODELS / "digits_cnn" / "w8a8.onnx"
DATA = MODELS / "data" / "digits_target_train.npz"


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".fgcompile.lock"}


def refused(args, *message, cwd=None, usage=False):
    """Run the CLI; it must exit 2 with one paragraph holding every `message` (usage: click's usage error,
    with its Usage and Try lines), and change nothing under cwd."""
    before = snapshot(cwd) if cwd else None
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output, r.output
    assert usage or len(r.stderr.strip().splitlines()) == 1, r.output
    for m in message:
        assert m in r.stderr, r.stderr
    if cwd:
        assert snapshot(cwd) == before
    return r


def config(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "out"
    assert CliRunner().invoke(main, ["compile", str(CNN), "-o", str(out), "--m", "1"]).exit_code == 0
    return out


# --config: each value is what the flag takes on the command line ----------------------------------------
WRONG_VALUES = {
    "a table for an int": ("m = {a = 1}", ["m = {", "a table", "an integer", "e.g. m = 1"]),
    "a list for an int": ("m = [1]", ["m = [", "a list", "an integer"]),
    "inf for an int": ("m = inf", ["m = inf", "an integer"]),
    "a fraction for an int": ("m = 8.7", ["m = 8.7", "a float", "an integer"]),
    "a bool for an int": ("m = true", ["m = true", "a boolean", "an integer"]),
    "a quoted int": ('m = "8"', ["m = '8'", "a string", "an integer"]),
    "a number for a path": ("calibration = 3", ["calibration = 3", "a path"]),
    "a table for a path": ("calibration = {x = 1}", ["calibration = {", "a path"]),
    "a number for a flag": ("no-bias = 1", ["no-bias = 1", "true or false"]),
    "a string for a list": ('train = "fc2"', ["train = 'fc2'", 'e.g. train = ["…"]']),
    "numbers in a list": ("train = [1, 2]", ["train = [", "a list of strings"]),
    "not a choice": ('loss = "hinge"', ["loss", "'hinge' is not one of 'auto', 'ce', 'mse', 'bce'"]),
    "a bool for a choice": ("bits = true", ["bits = true", "one of 8, 16"]),
    "beyond 64 bits": ("seed = 0x" + "f" * 20000, ["seed", "64-bit"]),
    "deep nesting": ("m = " + "[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    "an unknown key": ("mm = 3", ["no option 'mm'", "Options: "]),
    "the python name": ("memory-budget-mb = 3", ["no option 'memory-budget-mb'", "did you mean 'memory-budget'"]),
    "the python name of --json": ("as-json = true", ["no option 'as-json'", "did you mean 'json'"]),
}


@pytest.mark.parametrize("case", list(WRONG_VALUES))
def test_config_values_are_checked_like_flags(tmp_path, case):
    text, message = WRONG_VALUES[case]
    cfg = config(tmp_path, "[compile]\n" + text + "\n")
    refused(["compile", CNN, "-o", tmp_path / "out", "--config", cfg], f"--config {cfg}: ", *message, cwd=tmp_path)
    assert not (tmp_path / "out").exists()


def test_config_tables_and_file_kinds(tmp_path):
    refused(["compile", CNN, "-o", tmp_path / "out", "--config", config(tmp_path, "m = 3\n")],
            "'m' at the top level", "[compile]", cwd=tmp_path)
    refused(["compile", CNN, "-o", tmp_path / "out", "--config", config(tmp_path, "[trian]\nepochs = 3\n")],
            "unknown table [trian]", "[train]", cwd=tmp_path)
    refused(["compile", CNN, "-o", tmp_path / "out", "--config", config(tmp_path, "compile = 3\n")],
            "[compile] must be a table", cwd=tmp_path)
    (tmp_path / "garbage.toml").write_bytes(bytes(range(256)) * 4)
    refused(["compile", CNN, "-o", tmp_path / "out", "--config", tmp_path / "garbage.toml"], "not valid TOML",
            cwd=tmp_path)
    (tmp_path / "big.toml").write_bytes(b"# padding\n" * 110_000)
    refused(["compile", CNN, "-o", tmp_path / "out", "--config", tmp_path / "big.toml"], "at most 1 MiB",
            cwd=tmp_path)
    (tmp_path / "folder.toml").mkdir()
    refused(["compile", CNN, "-o", tmp_path / "out", "--config", tmp_path / "folder.toml"], "is a folder",
            cwd=tmp_path)
    refused(["compile", CNN, "-o", tmp_path / "out", "--config", tmp_path / "none.toml"], "no such file",
            cwd=tmp_path)
    assert not (tmp_path / "out").exists()


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (2 * 2 ** 30, 2 * 2 ** 30))


def test_config_fifo_and_device_are_not_read(tmp_path):
    """In a child process with 2 GiB of address space: the old reader filled memory from /dev/zero."""
    os.mkfifo(tmp_path / "fifo.toml")
    os.symlink("/dev/zero", tmp_path / "zero.toml")
    for name, message in [("fifo.toml", "is a FIFO (named pipe)"), ("zero.toml", "is a character device")]:
        before = snapshot(tmp_path)
        r = subprocess.run([sys.executable, "-m", "fgcompile.cli", "compile", str(CNN), "-o", str(tmp_path / "out"),
                            "--config", str(tmp_path / name)], capture_output=True, text=True, timeout=60,
                           preexec_fn=_limit_memory)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith(f"error: --config {tmp_path / name}: ")
        assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_config_fifo_in_process_does_not_block(tmp_path):
    """If the reader opened the FIFO it would block: a writer opened after 10 s unblocks it, and the
    command would then compile (exit 0) instead of refusing."""
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    unblock = threading.Timer(10, lambda: os.close(os.open(fifo, os.O_WRONLY)))
    unblock.start()
    try:
        refused(["compile", CNN, "-o", tmp_path / "out", "--config", fifo], "is a FIFO")
    finally:
        unblock.cancel()


def test_config_keys_are_the_flags_names(tmp_path):
    cfg = config(tmp_path, '[compile]\nmemory-budget = 3\njson = true\nlr_shift = 9\nm = 2\ntrain = ["fc2"]\n'
                           'bits = 16\nheadroom = "4"\nlr = 100\nno-bias = false\n')
    r = CliRunner().invoke(main, ["compile", str(CNN), "-o", str(tmp_path / "out"), "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    spec = json.loads(r.stdout)["contract"]["spec"]        # json = true: the output is JSON
    assert (spec["memory_budget_mb"], spec["lr_shift"], spec["m"], spec["train"]) == (3.0, 9, 2, ["fc2"])
    assert (spec["lr"], spec["headroom"], spec["include_bias"]) == (100.0, 4, True)


def test_config_relative_paths_and_train_section(tmp_path, compiled):
    out = tmp_path / "out"
    import shutil
    shutil.copytree(compiled, out)
    (tmp_path / "sub").mkdir()
    shutil.copy(DATA, tmp_path / "sub" / "d.npz")
    cfg = config(tmp_path / "sub", '[train]\ndata = "d.npz"\nepochs = 1\nbatch = 100\nquiet = true\nthreads = 1\n')
    r = CliRunner().invoke(main, ["train", str(out), "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["step"] == 5
    refused(["train", out, "--config", config(tmp_path, "[train]\nthreads = 100000\n")], "threads", "0<=x<=")


# --threads and verify --steps are bounded ----------------------------------------------------------------
def test_threads_and_steps_are_bounded(tmp_path, compiled):
    from fgcompile.session import MAX_THREADS
    assert 4 <= MAX_THREADS <= 4 * (os.cpu_count() or 1) + 4
    refused(["eval", CNN, "--data", DATA, "--threads", 100000], "--threads", f"0<=x<={MAX_THREADS}", usage=True)
    refused(["train", compiled, "--data", DATA, "--threads", MAX_THREADS + 1], "--threads", cwd=compiled, usage=True)
    refused(["tune", compiled, "--data", DATA, "--threads", -1], "--threads", cwd=compiled, usage=True)
    refused(["verify", compiled, "--steps", 100000], "--steps", "1<=x<=", usage=True)
    refused(["verify", compiled, "--steps", 0], "--steps", usage=True)
    with pytest.raises(SpecError, match="--threads 100000: at most"):
        fgcompile.SessionSettings(threads=100000)
    from fgcompile.runtime.conformance import verify
    with pytest.raises(SpecError, match="--steps 100000"):
        verify(compiled, steps=100000)


# --json: an error is one JSON object on stdout, too ----------------------------------------------------
def json_refused(args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    err = json.loads(r.stdout)
    assert set(err) == {"error", "kind"} and err["error"], r.stdout
    assert err["error"] in r.stderr                     # the same message, for a human reading the log
    return err


def test_json_errors_on_stdout(tmp_path, compiled):
    missing = tmp_path / "none"
    assert json_refused(["compile", missing, "-o", tmp_path / "out", "--json"])["kind"] == "ModelError"
    assert json_refused(["inspect", missing, "--json"])["kind"] == "ModelError"
    assert json_refused(["eval", CNN, "--data", missing, "--json"])["kind"] == "DataError"
    assert json_refused(["train", compiled, "--data", missing, "--json"])["kind"] == "DataError"
    assert json_refused(["tune", compiled, "--data", missing, "--json"])["kind"] == "DataError"
    assert json_refused(["export", missing, "-o", tmp_path / "a.onnx", "--json"])["kind"] == "ModelError"
    assert json_refused(["verify", missing, "--json"])["kind"] == "ModelError"
    # usage errors and --config errors, whether --json comes before or after them
    assert json_refused(["eval", CNN, "--data", DATA, "--json", "--threads", 100000])["kind"] == "UsageError"
    assert json_refused(["eval", CNN, "--json", "--no-such-flag"])["kind"] == "UsageError"
    cfg = config(tmp_path, "[compile]\nm = true\n")
    err = json_refused(["compile", CNN, "-o", tmp_path / "out", "--config", cfg, "--json"])
    assert err["kind"] == "SpecError" and "an integer" in err["error"]
    # without --json, stdout stays empty
    r = CliRunner().invoke(main, ["inspect", str(missing)])
    assert r.exit_code == 2 and r.stdout == ""


# The Python API checks its arguments ------------------------------------------------------------------
def test_api_argument_types(tmp_path):
    with pytest.raises(SpecError, match=r"compile_model\(spec=…\): no option 'mm'"):
        fgcompile.compile_model(CNN, spec={"mm": 3})
    with pytest.raises(SpecError, match=r"spec=.*a TrainSpec.*not int"):
        fgcompile.compile_model(CNN, spec=5)
    with pytest.raises(ModelError, match=r"model=…\): takes the path of an .onnx file or an onnx.ModelProto, not "
                                         r"NoneType"):
        fgcompile.compile_model(None)
    with pytest.raises(SpecError, match=r"TrainSpec\(m=8.7\): m takes an int or None, not float"):
        fgcompile.TrainSpec(m=8.7)
    with pytest.raises(SpecError, match=r"m takes an int or None, not bool"):
        fgcompile.TrainSpec(m=True)
    with pytest.raises(SpecError, match=r"train takes a list of str"):
        fgcompile.TrainSpec(train="fc2")
    with pytest.raises(SpecError, match=r"threads takes an int, not str"):
        fgcompile.SessionSettings(threads="4")
    with pytest.raises(FgcompileError, match=r"export_model\(trained=…\).*not NoneType"):
        fgcompile.export_model(None)
    with pytest.raises(FgcompileError, match=r"export_model\(trained=…\).*not dict"):
        fgcompile.export_model({}, tmp_path / "a.onnx")
    with pytest.raises(FgcompileError, match=r"evaluate\(model_or_out=…\).*not NoneType"):
        fgcompile.evaluate(None, DATA)
    with pytest.raises(DataError, match=r"evaluate\(data\): takes the path .* tuple \(x, y\).*got int"):
        fgcompile.evaluate(CNN, 5)
    with pytest.raises(DataError, match=r"evaluate\(data\): .*got \(int, int\)"):
        fgcompile.evaluate(CNN, (1, 2))
    with pytest.raises(DataError, match=r"evaluate\(data\): x has shape \[3, 64\]"):
        fgcompile.evaluate(CNN, (np.zeros((3, 64), np.float32), np.zeros(3, np.int64)))
    with pytest.raises(FgcompileError, match=r"evaluate\(batch=0\)"):
        fgcompile.evaluate(CNN, DATA, batch=0)
    with pytest.raises(FgcompileError, match=r"evaluate\(session=…\).*SessionSettings"):
        fgcompile.evaluate(CNN, DATA, session="x")
    compiled = fgcompile.compile_model(CNN, spec={"m": 2, "last": 1})     # a dict is a TrainSpec's fields
    assert compiled.contract.spec.m == 2
    with pytest.raises(FgcompileError, match=r"write_compiled\(compiled=…\).*not NoneType"):
        fgcompile.write_compiled(None, tmp_path / "o")
    with pytest.raises(FgcompileError, match=r"write_compiled\(out_dir=…\).*not NoneType"):
        fgcompile.write_compiled(compiled, None)
    x, y = np.load(DATA)["x"][:8], np.load(DATA)["y"][:8]
    assert fgcompile.evaluate(CNN, (x, y))["samples"] == 8
    assert os.listdir(tmp_path) == []


# --log-level after the command -------------------------------------------------------------------------
def test_log_level_after_the_command(tmp_path):
    import logging
    try:
        r = CliRunner().invoke(main, ["compile", str(CNN), "-o", str(tmp_path / "out"), "--log-level", "info"])
        assert r.exit_code == 0 and "INFO fgcompile.compile: compiled" in r.stderr, r.output
        r = CliRunner().invoke(main, ["--log-level", "info", "compile", str(CNN), "-o", str(tmp_path / "out"),
                                      "--log-level", "error"])
        assert r.exit_code == 0 and "INFO" not in r.stderr, r.output
    finally:
        logging.getLogger().handlers.clear()
