"""State that is not what it claims (issue #27): a state.npz or checkpoint of another compile with the same
shapes, an interrupted epoch's metrics, tune's --folds 1 and one-class data, and API arguments of the wrong
type. Each is refused with one paragraph (exit 2) and leaves the user's files as they were, or, for the
resumed epoch, logs what an uninterrupted run logs."""
import json
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fgcompile
from conftest import MODELS
from fgcompile.errors import FgcompileError
from fgcompile.runtime import checkpoint
from test_bad_input_catalogue import CNN, TRAIN, invoke, refused, snapshot

TEST = MODELS / "data" / "digits_target_test.npz"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two compiles of one model whose state has the same names, shapes and dtypes on another grid."""
    root = tmp_path_factory.mktemp("grids")
    for name, args in (("default", ()), ("headroom2", ("--headroom", 2))):
        assert invoke("compile", CNN, "-o", root / name, "--m", 2, *args).exit_code == 0
    return root


@pytest.fixture
def out(tmp_path, folders):
    shutil.copytree(folders / "default", tmp_path / "out")
    return tmp_path / "out"


def other_grid(folders):
    mine, other = (checkpoint.load(folders / f / "state.npz")[0] for f in ("default", "headroom2"))
    assert {k: (v.dtype, v.shape) for k, v in mine.items()} == {k: (v.dtype, v.shape) for k, v in other.items()}
    assert any((mine[k] != other[k]).any() for k in mine), "the grids differ"
    return folders / "headroom2"


COMMANDS = {   # every command that reads a folder's state, with what it would write
    "train": ("train", "{out}", "--data", TRAIN, "--epochs", 1, "--quiet"),
    "resume": ("train", "{out}", "--data", TRAIN, "--epochs", 1, "--quiet", "--resume"),
    "eval": ("eval", "{out}", "--data", TEST),
    "export": ("export", "{out}", "-o", "{tmp}/adapted.onnx"),
    "tune": ("tune", "{out}", "--data", TRAIN, "--epochs", 1, "--holdout", 0.2),
}


def every_command_refuses(out, tmp_path, message, commands=tuple(COMMANDS)):
    kept = snapshot(out)
    for name in commands:
        args = COMMANDS[name]
        r = invoke(*[str(a).format(out=out, tmp=tmp_path) for a in args])
        refused(r, message)
    assert snapshot(out) == kept and not (tmp_path / "adapted.onnx").exists()


def test_state_of_another_grid_is_refused_by_every_command(tmp_path, folders, out):
    """Was: eval scored the other grid's weights with exit 0 and train trained from them; only export refused."""
    shutil.copy(other_grid(folders) / "state.npz", out / "state.npz")
    every_command_refuses(out, tmp_path, "state.npz: belongs to another compile")


def test_checkpoint_of_another_grid_or_without_a_record_is_refused(tmp_path, folders, out):
    other = other_grid(folders)
    assert invoke("train", out, "--data", TRAIN, "--epochs", 1, "--quiet").exit_code == 0
    shutil.copy(other / "state.npz", out / "checkpoint.npz")     # another compile's state as the checkpoint
    trained = ("train", "resume", "eval", "export")              # tune starts from state.npz only
    every_command_refuses(out, tmp_path, "checkpoint.npz: belongs to another compile", trained)
    state, meta = checkpoint.load(out / "state.npz")
    checkpoint.save(out / "checkpoint.npz", state, {"step": 15, "bad_steps": 0})   # no record of its compile
    every_command_refuses(out, tmp_path, "checkpoint.npz: records no train.onnx", trained)


def test_state_npz_of_an_older_fgcompile_is_checked_against_the_source(tmp_path, folders, out):
    """A state.npz without a record (written before state files recorded their compile) still loads when it
    is this folder's initial state, and is refused when it is another grid's."""
    want = invoke("eval", out, "--data", TEST)
    np.savez(out / "state.npz", **checkpoint.load(out / "state.npz")[0])
    r = invoke("eval", out, "--data", TEST)
    assert r.exit_code == 0 and r.output == want.output, r.output
    np.savez(out / "state.npz", **checkpoint.load(other_grid(folders) / "state.npz")[0])
    every_command_refuses(out, tmp_path, "state.npz: is not this folder's initial state")


RUN = dict(epochs=2, batch=32, checkpoint_every=4, progress=False, schedule="constant")   # 15 steps per epoch


def log_of(folder):
    """The log without wall-clock time."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_a_run_killed_mid_epoch_logs_the_epoch_as_an_uninterrupted_run(tmp_path, folders):
    """Was: after kill -9 at step 9 and --resume (from the checkpoint at step 8), epoch 1's train_loss and
    train_accuracy were the mean of steps 8..14 only, not of its 15 steps."""
    full, killed = (shutil.copytree(folders / "default", tmp_path / name) for name in ("full", "killed"))
    fgcompile.Trainer(full).fit(str(TRAIN), **RUN)
    script = textwrap.dedent(f"""
        import os, signal
        from fgcompile.runtime.trainer import Trainer
        Trainer({str(killed)!r}).fit({str(TRAIN)!r}, stop_after=9, **{RUN!r})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert checkpoint.load(killed / "checkpoint.npz")[1]["step"] == 8 and not (killed / "train_log.jsonl").exists()
    r = invoke("train", killed, "--data", TRAIN, "--epochs", 2, "--checkpoint-every", 4, "--schedule", "constant",
               "--quiet", "--resume")
    assert r.exit_code == 0 and "note:" not in r.output, r.output
    assert log_of(killed) == log_of(full)
    for name, value in checkpoint.load(full / "checkpoint.npz")[0].items():
        np.testing.assert_array_equal(checkpoint.load(killed / "checkpoint.npz")[0][name], value)


def test_a_checkpoint_without_the_epochs_sums_resumes_and_says_what_the_epoch_covers(tmp_path, folders):
    out = shutil.copytree(folders / "default", tmp_path / "out")
    fgcompile.Trainer(out).fit(str(TRAIN), stop_after=9, **RUN)
    state, meta = checkpoint.load(out / "checkpoint.npz")
    del meta["epoch_sums"]                                       # as an older fgcompile wrote it
    checkpoint.save(out / "checkpoint.npz", state, meta)
    r = invoke("train", out, "--data", TRAIN, "--epochs", 2, "--checkpoint-every", 4, "--schedule", "constant",
               "--quiet", "--resume")
    assert r.exit_code == 0, r.output
    assert "note: epoch 1's train_loss and train_accuracy cover its steps from 8 on" in r.output, r.output
    assert [h["epoch"] for h in log_of(out)] == [1, 2]


@pytest.fixture(scope="module")
def compiled():
    return fgcompile.compile_model(CNN, fgcompile.TrainSpec(m=2))


def data():
    d = np.load(TRAIN)
    return d["x"], d["y"]


API_CASES = {
    "Trainer(123)": (lambda c: fgcompile.Trainer(123),
                     "Trainer(123): takes a compiled folder (a path) or the result of fgcompile.compile_model"),
    "Trainer(None)": (lambda c: fgcompile.Trainer(None), "Trainer(None): takes a compiled folder"),
    "tune(123)": (lambda c: fgcompile.tune(123, str(TRAIN)), "Trainer(123): takes a compiled folder"),
    "x a list": (lambda c: fgcompile.Trainer(c).fit((data()[0].tolist(), data()[1]), epochs=1, progress=False),
                 "fit(data): takes the path of a .npz data file, or a tuple (x, y) of numpy arrays (x an array, y the "
                 "int64 labels); got (list, ndarray)"),
    "y a list": (lambda c: fgcompile.Trainer(c).fit((data()[0], list(data()[1])), epochs=1, progress=False),
                 "got (ndarray, list)"),
    "a 1-tuple": (lambda c: fgcompile.Trainer(c).fit((data()[0],), epochs=1, progress=False), "got a tuple of 1"),
    "an int": (lambda c: fgcompile.Trainer(c).fit(5, epochs=1, progress=False), "got int"),
    "val a list": (lambda c: fgcompile.Trainer(c).fit(data(), val=[1, 2], epochs=1, progress=False),
                   "fit(val): takes the path of a .npz data file, or a tuple (x, y) of numpy arrays (x an array, y the int64 labels); got list"),
    "too few labels": (lambda c: fgcompile.Trainer(c).fit((data()[0], data()[1][:5]), epochs=1, progress=False),
                       "fit(data): y has shape [5] but x holds 500 samples"),
    "float labels": (lambda c: fgcompile.Trainer(c).fit((data()[0], data()[1].astype(np.float32)), epochs=1,
                                                        progress=False), "fit(data): y has dtype float32"),
    "epochs a string": (lambda c: fgcompile.Trainer(c).fit(data(), epochs="5", progress=False),
                        "fit(epochs='5'): takes a whole number of at least 1"),
    "lr a string": (lambda c: fgcompile.Trainer(c).fit(data(), lr="8", epochs=1, progress=False),
                    "fit(lr='8'): takes a rate in LSBs per unit of ĝ (a number), or None"),
    "fgcompile.evaluate a list": (lambda c: fgcompile.evaluate(CNN, (data()[0].tolist(), data()[1])),
                                  "evaluate(data): takes the path of a .npz data file, or a tuple (x, y)"),
    "evaluate a list": (lambda c: fgcompile.Trainer(c).evaluate(data()[0].tolist(), data()[1]),
                        "evaluate(x, y): takes the path of a .npz data file, or a tuple (x, y) of numpy arrays (x an array, y the int64 labels); got (list, ndarray)"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_arguments_of_the_wrong_type_raise_a_clear_error(compiled, case):
    call, message = API_CASES[case]
    with pytest.raises(FgcompileError) as info:
        call(compiled)
    assert message in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_in_memory_data_is_checked_like_a_data_file(compiled):
    """float64 x is the one conversion a data file gets too; the arrays a caller passes are not changed."""
    x, y = data()
    x64 = x.astype(np.float64)
    trainer = fgcompile.Trainer(compiled)
    trainer.fit((x64, y), epochs=1, progress=False)
    assert x64.dtype == np.float64
    other = fgcompile.Trainer(compiled)
    other.fit(str(TRAIN), epochs=1, progress=False)
    for name, value in other.state.items():
        np.testing.assert_array_equal(trainer.state[name], value)


def test_in_memory_data_of_a_model_with_several_inputs_is_a_dict_of_arrays():
    import qdq_graphs
    compiled = fgcompile.compile_model(qdq_graphs.two_input_model(), fgcompile.TrainSpec(m=2))
    rng = np.random.default_rng(0)
    x, y = {"x": rng.uniform(0, 1, (32, 4)).astype(np.float32), "ids": rng.integers(0, 20, (32, 3))}, rng.integers(0, 5, 32)
    trainer = fgcompile.Trainer(compiled)
    assert len(trainer.fit((x, y), epochs=1, batch=16, progress=False)) == 1
    with pytest.raises(FgcompileError, match="fit\\(data\\): x has no array for the model input 'ids'"):
        trainer.fit(({"x": x["x"]}, y), epochs=1, progress=False)
    with pytest.raises(FgcompileError, match="x a dict of one array per input \\(x, ids\\), y the int64 labels\\); got \\(ndarray, ndarray\\)\\. Pass x as \\{'x': array, 'ids': array\\}"):
        trainer.fit((x["x"], y), epochs=1, progress=False)
    with pytest.raises(FgcompileError, match="fit\\(data\\): ids has shape \\[32, 2\\] but the model input is"):
        trainer.fit(({**x, "ids": x["ids"][:, :2]}, y), epochs=1, progress=False)
