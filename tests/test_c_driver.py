"""The example C driver (examples/c/fgc_train.c, onnxruntime's C API) trains a compiled folder bit for bit
as fgcompile's Trainer does: same batches, seed, step numbers, lr numerator, and the state fed back only
after a finite loss. Runs where a C compiler, make and onnxruntime's C headers are found; .ci/c-driver
installs them and runs this file."""
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fgcompile.compiler import compile_model, write_compiled
from fgcompile.runtime.trainer import Trainer
from conftest import MODELS, shipped
from qdq_graphs import qdq_model
from steps import Steps

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "c"
DATA = MODELS / "data" / "digits_target_train.npz"


def _headers() -> str:
    """The Makefile's onnxruntime include folder, or '' (no example here, no compiler, no headers)."""
    if not (EXAMPLE / "Makefile").is_file() or not (shutil.which("cc") and shutil.which("make")):
        return ""
    found = subprocess.run(["make", "-s", "-C", str(EXAMPLE), "print-include"], capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else ""


pytestmark = [pytest.mark.cdriver, pytest.mark.skipif(
    not _headers(), reason="needs cc, make and onnxruntime's C headers: run .ci/c-driver (or "
                           "examples/c/get_ort_headers.sh once) to build and test the C driver")]


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> pathlib.Path:
    build = tmp_path_factory.mktemp("build")
    subprocess.run(["make", "-s", "-C", str(EXAMPLE), f"BUILD={build}", f"PYTHON={sys.executable}"], check=True)
    return build / "fgc_train"


@pytest.fixture(scope="module")
def compiled():
    return compile_model(shipped("digits_cnn/w8a8.onnx"))


def folder(compiled, tmp_path) -> pathlib.Path:
    return write_compiled(compiled, tmp_path / "out")


def export(out: pathlib.Path, run: pathlib.Path, steps: int, batch: int = 32, data=DATA) -> None:
    subprocess.run([sys.executable, str(EXAMPLE / "export_run.py"), str(out), str(data), str(run),
                    "--steps", str(steps), "--batch", str(batch)], check=True, capture_output=True)


def train(driver, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(driver), *map(str, args)], capture_output=True, text=True)


def final_state(final: pathlib.Path, like: dict) -> dict:
    """The state files fgc_train wrote (state_i.bin, in the contract's order), shaped as `like`'s."""
    return {name: np.fromfile(final / f"state_{i}.bin", a.dtype).reshape(a.shape) for i, (name, a) in enumerate(like.items())}


def test_trains_like_the_trainer(driver, compiled, tmp_path):
    """20 steps (past an epoch's end at 15) with the contract's seed and lr: the same bits as Trainer.fit."""
    out = folder(compiled, tmp_path)
    export(out, tmp_path / "run", 20)
    ran = train(driver, out / "train.onnx", tmp_path / "run", 20, tmp_path / "final")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.count("\nstep ") == 19 and "0 with a non-finite loss" in ran.stdout

    trainer = Trainer(out)
    trainer.fit(DATA, epochs=2, batch=32, schedule="constant", stop_after=20, progress=False)
    assert trainer.meta["step"] == 20
    got = final_state(tmp_path / "final", trainer.state)
    for name, want in trainer.state.items():
        assert got[name].tobytes() == want.tobytes(), name
        assert not np.array_equal(want, compiled.state[name]), f"{name} did not train; the test shows nothing"


def test_seed_lr_and_non_finite_steps(driver, tmp_path):
    """--seed 2^32-1 (fed as int32 -1), --lr 2048 and a batch with a NaN at step 3, whose loss is NaN (the
    model has a float path from its input to the logits): the step is reported and its outputs dropped,
    and the final state has the same bits as the steps run from Python with the runtime's own feeds."""
    compiled = compile_model(qdq_model(float_residual=True))
    out, run, data = folder(compiled, tmp_path), tmp_path / "run", tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.uniform(0, 1, (64, 3)).astype(np.float32), y=rng.integers(0, 4, 64))
    export(out, run, 6, batch=16, data=data)
    x = np.fromfile(run / "x.bin", np.float32).reshape(6, 16, 3)
    x[3, 5] = np.nan
    x.tofile(run / "x.bin")
    y = np.fromfile(run / "labels.bin", np.int64).reshape(6, 16)
    ran = train(driver, "--seed", 2 ** 32 - 1, "--lr", 2048, out / "train.onnx", run, 6, tmp_path / "final")
    assert ran.returncode == 0, ran.stderr
    assert "step 3 loss nan: not finite, state kept" in ran.stdout and "1 with a non-finite loss" in ran.stdout

    steps, state = Steps(compiled, optimization="all"), dict(compiled.state)
    for k in range(6):
        result = steps(x[k], y[k], seed=2 ** 32 - 1, step=k, lr_numerator=2048, state=state)
        if np.isfinite(result["loss"]):
            state = steps.next_state(result)
    got = final_state(tmp_path / "final", state)
    for name, want in state.items():
        assert got[name].tobytes() == want.tobytes(), name
        assert not np.array_equal(want, compiled.state[name]), f"{name} did not train; the test shows nothing"


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "--seed -1: expected a whole number in [0, 4294967295]"),
    (["--lr", "0"], "--lr 0: expected a whole number in [1, 2147483647]"),
    (["--threads", "x"], "--threads x: expected a whole number"),
    (["--bogus"], "unknown option --bogus"),
    ([], "expected 4 arguments, got 0"),
])
def test_refuses_bad_arguments(driver, args, message):
    ran = train(driver, *args, *(["train.onnx", "run", "5", "final"] if args else []))
    assert ran.returncode == 1 and message in ran.stderr


def test_refuses_bad_files(driver, compiled, tmp_path):
    out = folder(compiled, tmp_path)
    ran = train(driver, out / "train.onnx", tmp_path / "missing", 5, tmp_path / "final")
    assert ran.returncode == 1 and f"{tmp_path / 'missing'}/manifest.txt: cannot open it" in ran.stderr
    export(out, tmp_path / "run", 2)
    ran = train(driver, "--lr", 2 ** 31 - 1, out / "train.onnx", tmp_path / "run", 5, tmp_path / "final")
    assert ran.returncode == 1 and "--lr 2147483647: " in ran.stderr and "(its lr_numerator.max)" in ran.stderr
    (tmp_path / "run" / "state_1.bin").write_bytes(b"\0" * 8)
    ran = train(driver, out / "train.onnx", tmp_path / "run", 5, tmp_path / "final")
    assert ran.returncode == 1 and "state_1.bin: holds 8 bytes; the manifest's state fc2.bias_quantized needs 40" in ran.stderr
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "state_0.bin").write_bytes(b"mine")
    export(out, tmp_path / "run2", 2)
    ran = train(driver, out / "train.onnx", tmp_path / "run2", 5, tmp_path / "final")
    assert ran.returncode == 1 and "exists; fgc_train does not overwrite files" in ran.stderr
    assert (tmp_path / "final" / "state_0.bin").read_bytes() == b"mine"
