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


# ------------------------------------------------------------------------------------------------------------
# Output safety: what compile, export and train may overwrite (issue #11)

def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in r.output and not isinstance(r.exception, (AssertionError, TypeError, KeyError)), \
        r.output
    return r


def refused(r, message):
    assert r.exit_code == 2, r.output
    assert message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output  # one paragraph


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid():
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_compile_refuses_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's work")
    refused(invoke("compile", CNN, "-o", out), "was not written by fgcompile")
    assert snapshot(out) == {"notes.txt": b"the user's work"}


def test_compile_refuses_an_output_that_holds_the_input(tmp_path, monkeypatch):
    shutil.copy(CNN, tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    for out in (".", str(tmp_path)):
        refused(invoke("compile", "m.onnx", "-o", out), "holds the input m.onnx")
    assert snapshot(tmp_path) == before
    assert invoke("compile", "m.onnx", "-o", "out").exit_code == 0
    shutil.copy(CNN, tmp_path / "out" / "again.onnx")  # a model kept inside a compiled folder
    refused(invoke("compile", "out/again.onnx", "-o", "out", "--force"), "holds the input")


def test_compile_replaces_a_compiled_folder_but_keeps_training_unless_forced(tmp_path):
    out = tmp_path / "out"
    assert invoke("compile", CNN, "-o", out, "--m", 1).exit_code == 0
    assert invoke("compile", CNN, "-o", out, "--m", 2).exit_code == 0   # nothing of the user's in it
    assert invoke("train", out, "--data", TRAIN, "--epochs", 1, "--quiet").exit_code == 0
    kept = snapshot(out)
    refused(invoke("compile", CNN, "-o", out, "--m", 3), "holds training (checkpoint.npz, train_log.jsonl)")
    assert snapshot(out) == kept
    assert invoke("compile", CNN, "-o", out, "--m", 3, "--force").exit_code == 0
    assert not (out / "checkpoint.npz").exists()


def test_compile_recovers_a_folder_lost_between_the_two_renames(tmp_path):
    out = tmp_path / "out"
    assert invoke("compile", CNN, "-o", out).exit_code == 0
    want = snapshot(out)
    pid = dead_pid()
    os.replace(out, tmp_path / f".out.fgcompile-old-{pid}")          # the crash: out renamed away ...
    (tmp_path / f".out.fgcompile-staging-{pid}-x1").mkdir()           # ... the new one never renamed in
    (tmp_path / f".out.fgcompile-staging-{pid}-x1" / "train.onnx").write_bytes(b"half")
    r = invoke("eval", out, "--data", TRAIN)
    assert r.exit_code == 0, r.output
    assert snapshot(out) == want and sorted(os.listdir(tmp_path)) == ["out"]


def test_kill_9_leftovers_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    assert invoke("compile", CNN, "-o", out).exit_code == 0
    stale = out / f".checkpoint.npz.fgcompile-{dead_pid()}-abc.tmp"
    live = out / f".checkpoint.npz.fgcompile-{os.getpid()}-abc.tmp"
    foreign = out / ".checkpoint.npz.other.tmp"
    for p in (stale, live, foreign):
        p.write_bytes(b"partial")
    assert invoke("train", out, "--data", TRAIN, "--epochs", 1, "--quiet").exit_code == 0
    assert not stale.exists() and live.exists() and foreign.exists()


def test_demo_with_zero_epochs_writes_nothing(tmp_path):
    refused(invoke("demo", "-o", tmp_path / "d", "--epochs", 0), "--epochs 0")
    assert not (tmp_path / "d").exists()


@pytest.fixture
def trained(tmp_path, compiled):
    out = tmp_path / "out"
    shutil.copytree(compiled, out)
    r = invoke("train", out, "--data", TRAIN, "--epochs", 1, "--quiet", "--checkpoint-every", 7)
    assert r.exit_code == 0, r.output
    return out


def test_export_writes_only_regular_files(tmp_path, trained):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "null").symlink_to("/dev/null")
    (tmp_path / "dir").mkdir()
    kept = snapshot(trained)
    cases = {fifo: "is a FIFO", tmp_path / "null": "is a character device", tmp_path / "dir": "is a folder",
             trained / "checkpoint.npz": "inside the compiled folder", trained / "train.onnx": "inside the compiled",
             trained: "inside the compiled folder"}
    for target, message in cases.items():
        refused(invoke("export", trained, "-o", target), message)
    assert snapshot(trained) == kept and os.path.islink(tmp_path / "null") and (tmp_path / "dir").is_dir()


def test_export_never_overwrites_the_source_model(tmp_path):
    shutil.copy(CNN, tmp_path / "m.onnx")
    assert invoke("compile", tmp_path / "m.onnx", "-o", tmp_path / "out").exit_code == 0
    refused(invoke("export", tmp_path / "out", "-o", tmp_path / "m.onnx"), "the model")
    assert (tmp_path / "m.onnx").read_bytes() == CNN.read_bytes()


def test_train_refuses_to_discard_a_checkpoint(trained):
    kept = snapshot(trained)
    refused(invoke("train", trained, "--data", TRAIN, "--quiet"), "already holds a trained checkpoint (step 15)")
    assert snapshot(trained) == kept
    r = invoke("train", trained, "--data", TRAIN, "--quiet", "--epochs", 1, "--restart")
    assert r.exit_code == 0, r.output
    assert len((trained / "train_log.jsonl").read_text().splitlines()) == 1


def test_a_second_train_on_one_folder_exits_naming_the_first(trained):
    from fgcompile import folder
    kept = snapshot(trained)
    with folder.locked(trained):     # as a running `train` holds it
        r = invoke("train", trained, "--data", TRAIN, "--quiet", "--resume", "--epochs", 2)
        refused(r, f"another fgcompile process (pid {os.getpid()}) is using this folder")
        refused(invoke("compile", CNN, "-o", trained, "--force"), f"(pid {os.getpid()})")
    assert snapshot(trained) == {**kept, ".fgcompile.lock": (trained / ".fgcompile.lock").read_bytes()}
    assert invoke("train", trained, "--data", TRAIN, "--quiet", "--resume", "--epochs", 2).exit_code == 0


def test_a_resumed_run_logs_each_epoch_once(tmp_path, compiled):
    import json
    from fgcompile.runtime.trainer import Trainer
    out = tmp_path / "out"
    shutil.copytree(compiled, out)
    # epoch 1 ends at step 15 and is logged; the last checkpoint is step 14, so a resume replays step 15
    Trainer(out).fit(str(TRAIN), epochs=2, checkpoint_every=7, progress=False, stop_after=17)
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"epoch": 2, "st')   # a line torn by kill -9
    r = invoke("train", out, "--data", TRAIN, "--epochs", 2, "--quiet", "--resume", "--checkpoint-every", 7)
    assert r.exit_code == 0, r.output
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in log] == [1, 2]


def test_resume_with_another_run_says_what_changed(trained, tmp_path):
    resume = ("train", trained, "--quiet", "--resume", "--epochs", 1)
    refused(invoke(*resume, "--data", TRAIN, "--batch", 16), "the run differs from the checkpoint's (batch 32 -> 16)")
    d = np.load(TRAIN)
    np.savez(tmp_path / "other.npz", x=d["x"][::-1], y=d["y"][::-1])
    refused(invoke(*resume, "--data", tmp_path / "other.npz"), "(data_sha256 changed)")
    refused(invoke(*resume, "--data", TRAIN, "--schedule", "cosine"), "(schedule constant -> cosine)")
    r = invoke("train", trained, "--data", TRAIN, "--quiet", "--resume", "--epochs", 2)  # constant lr: extends
    assert r.exit_code == 0 and "note: resuming with a changed run: epochs 1 -> 2" in r.output, r.output
    r = invoke("train", trained, "--data", TRAIN, "--quiet", "--resume", "--epochs", 3, "--batch", 16,
               "--allow-changed-run")
    assert r.exit_code == 0 and "batch 32 -> 16, epochs 2 -> 3" in r.output, r.output


def test_checkpoint_or_log_path_that_is_a_folder(compiled, tmp_path):
    for name in ("checkpoint.npz", "train_log.jsonl"):
        out = tmp_path / name
        shutil.copytree(compiled, out)
        (out / name).mkdir()
        refused(invoke("train", out, "--data", TRAIN, "--quiet", "--resume"), "is not a regular file")
