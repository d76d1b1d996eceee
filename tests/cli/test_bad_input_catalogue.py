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


def conv2_auto_pad():
    """digits_cnn with conv2's pads given as auto_pad SAME_UPPER (the same 4x4 output)."""
    from onnx import helper
    m = onnx.load(CNN)
    conv2 = next(n for n in m.graph.node if n.name == "conv2")
    kept = [a for a in conv2.attribute if a.name != "pads"]
    del conv2.attribute[:]
    conv2.attribute.extend(kept + [helper.make_attribute("auto_pad", "SAME_UPPER")])
    return m


def external_data_missing(tmp):
    onnx.save(onnx.load(CNN), tmp / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    os.remove(tmp / "ext.data")
    return tmp / "ext.onnx"


def layers_inside_if(tmp):
    """A float model whose layers sit in an If's branches (on a sample rate, say), as quantize_static
    leaves it: nothing quantized."""
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])

    def branch(name, scale):
        w = helper.make_tensor(f"W_{name}", TensorProto.FLOAT, [4, 3], [scale] * 12)
        out = helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, ["batch", 3])
        return helper.make_graph([helper.make_node("MatMul", ["x", f"W_{name}"], [f"y_{name}"])], name, [], [out], [w])
    cond = helper.make_tensor("at_16k", TensorProto.BOOL, [], [True])
    node = helper.make_node("If", ["at_16k"], ["y"], name="by_rate", then_branch=branch("then", 1.0),
                            else_branch=branch("else", 0.5))
    return helper.make_model(helper.make_graph([node], "g", [x], [y], [cond]), opset_imports=[helper.make_opsetid("", 21)])


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
    "layers inside an If": (model_file(layers_inside_if), [], "sit inside the branches of 'by_rate' (If/Loop/Scan)"),
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
    "headroom not a power of two": (model_file(lambda t: onnx.load(CNN)), ["--headroom", "3"],
                                    "'3' is not one of 'auto', '1'"),
    "train pattern matches nothing": (model_file(lambda t: onnx.load(CNN)), ["--train", "^nothing$"],
                                      "matches no weight site"),
    "node estimator on an auto_pad Conv": (model_file(lambda t: conv2_auto_pad()), ["--estimator", "node", "--last", "3"],
                                           "site 'conv2' is a Conv with auto_pad 'SAME_UPPER'"),
    "node schedule without the node estimator": (model_file(lambda t: onnx.load(CNN)),
                                                 ["--node-schedule", "alternate", "--estimator", "sign"],
                                                 "applies to --estimator node only"),
    "node schedule where auto chose sign": (model_file(lambda t: onnx.load(CNN)),
                                            ["--node-schedule", "alternate", "--train", "fc1", "--m", "32"],
                                            "--estimator auto chose sign here (one layer trains"),
    "node schedule where auto chose head": (model_file(lambda t: onnx.load(CNN)), ["--node-schedule", "alternate"],
                                            "--estimator auto chose head here (the output layer trains alone"),
    "head estimator deeper than the output layer": (model_file(lambda t: onnx.load(CNN)),
                                                    ["--estimator", "head", "--last", "2"],
                                                    "2 layers train; it trains the output layer alone"),
    "head estimator on a hidden layer": (model_file(lambda t: onnx.load(CNN)), ["--estimator", "head", "--train", "fc1"],
                                         "site 'fc1' does not write the logits the loss reads"),
    "head estimator with the Brier loss": (model_file(lambda t: onnx.load(CNN)),
                                           ["--estimator", "head", "--loss", "mse"], "--loss mse (its gradient"),
    "head estimator with perturbations": (model_file(lambda t: onnx.load(CNN)), ["--estimator", "head", "--m", "8"],
                                          "draws no perturbation"),
    "head estimator in the loop form": (model_file(lambda t: onnx.load(CNN)),
                                        ["--estimator", "head", "--branches", "loop"],
                                        "--estimator head does not take --branches loop yet"),
    "unknown forward": (model_file(lambda t: onnx.load(CNN)), ["--forward", "fast"],
                        "'fast' is not one of 'qdq', 'exact'"),
    "unknown node schedule": (model_file(lambda t: onnx.load(CNN)), ["--estimator", "node", "--node-schedule", "each"],
                              "'each' is not one of 'auto', 'all', 'alternate'"),
    "node estimator in the cloned form": (model_file(lambda t: onnx.load(CNN)),
                                          ["--estimator", "node", "--branches", "cloned"],
                                          "does not take --branches cloned yet"),
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
def test_train_data_catalogue(tmp_path, compiled, out, case):
    arrays, message = DATA_CASES[case]
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


@pytest.fixture
def out(tmp_path, compiled):
    """A private copy of the compiled folder, at tmp_path/out, for a test to run commands on."""
    copy = tmp_path / "out"
    shutil.copytree(compiled, copy)
    return copy


def refused(r, message):
    assert r.exit_code == 2, r.output
    assert message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output  # one paragraph


def snapshot(folder):
    """Every file under folder with its bytes (the lock file holds the pid of the last run: not content)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".fgcompile.lock"}


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
def trained(out):
    r = invoke("train", out, "--data", TRAIN, "--epochs", 1, "--quiet", "--checkpoint-every", 7, "--schedule", "constant")
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
        r = invoke("train", trained, "--data", TRAIN, "--quiet", "--resume", "--epochs", 2, "--schedule", "constant")
        refused(r, f"another fgcompile process (pid {os.getpid()}) is using this folder")
        refused(invoke("compile", CNN, "-o", trained, "--force"), f"(pid {os.getpid()})")
    assert snapshot(trained) == kept
    assert invoke("train", trained, "--data", TRAIN, "--quiet", "--resume", "--epochs", 2, "--schedule",
                  "constant").exit_code == 0


def test_a_resumed_run_logs_each_epoch_once(out):
    import json
    from fgcompile.runtime.trainer import Trainer
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
    constant = ("--schedule", "constant")                       # the trained fixture's
    refused(invoke(*resume, *constant, "--data", TRAIN, "--batch", 16),
            "the run differs from the checkpoint's (batch 32 -> 16)")
    d = np.load(TRAIN)
    np.savez(tmp_path / "other.npz", x=d["x"][::-1], y=d["y"][::-1])
    refused(invoke(*resume, *constant, "--data", tmp_path / "other.npz"), "(data_sha256 changed)")
    refused(invoke(*resume, "--data", TRAIN, "--schedule", "cosine"), "(schedule constant -> cosine)")
    refused(invoke(*resume, "--data", TRAIN), "(schedule constant -> cosine)")    # the default schedule is cosine
    r = invoke("train", trained, "--data", TRAIN, "--quiet", "--resume", "--epochs", 2, *constant)  # extends
    assert r.exit_code == 0 and "note: resuming with a changed run: epochs 1 -> 2" in r.output, r.output
    r = invoke("train", trained, "--data", TRAIN, "--quiet", "--resume", "--epochs", 3, "--batch", 16, *constant,
               "--allow-changed-run")
    assert r.exit_code == 0 and "batch 32 -> 16, epochs 2 -> 3" in r.output, r.output


def test_more_epochs_on_a_default_cosine_run_is_refused_unless_allowed(out):
    """The default schedule is cosine, whose rate depends on the run's length: resuming a finished run with
    more epochs would not replay one run, so it is refused and says what changed and the way out."""
    r = invoke("train", out, "--data", TRAIN, "--epochs", 1, "--quiet")
    assert r.exit_code == 0, r.output
    kept = snapshot(out)
    refused(invoke("train", out, "--data", TRAIN, "--epochs", 2, "--quiet", "--resume"), "(epochs 1 -> 2)")
    assert snapshot(out) == kept
    r = invoke("train", out, "--data", TRAIN, "--epochs", 2, "--quiet", "--resume", "--allow-changed-run")
    assert r.exit_code == 0 and "note: resuming with a changed run: epochs 1 -> 2" in r.output, r.output


def test_checkpoint_or_log_path_that_is_a_folder(compiled, tmp_path):
    for name in ("checkpoint.npz", "train_log.jsonl"):
        out = tmp_path / name
        shutil.copytree(compiled, out)
        (out / name).mkdir()
        refused(invoke("train", out, "--data", TRAIN, "--quiet", "--resume"), "is not a regular file")


# ------------------------------------------------------------------------------------------------------------
# Silent corruption: state, checkpoints and the contract are checked against the graph on every load

ATTN = MODELS / "digits_attn" / "w8a8.onnx"


def set_contract(out, edit):
    import json
    model = onnx.load(out / "train.onnx")
    prop = next(p for p in model.metadata_props if p.key == "fgcompile")
    prop.value = edit(json.loads(prop.value))
    onnx.save(model, out / "train.onnx")


def all_commands_refuse(out, message, tmp_path):
    kept = snapshot(out)
    refused(invoke("export", out, "-o", tmp_path / "adapted.onnx"), message)
    refused(invoke("eval", out, "--data", TRAIN), message)
    refused(invoke("train", out, "--data", TRAIN, "--quiet", "--epochs", 1, "--resume"), message)
    assert snapshot(out) == kept and not (tmp_path / "adapted.onnx").exists()


def edited(**fields):
    def edit(c):
        import json
        c["state"][0].update(fields)
        return json.dumps(c)
    return edit


CONTRACT_EDITS = {
    "bad JSON": (lambda c: "{not json", "is not valid JSON"),
    "missing key": (lambda c: __import__("json").dumps({k: v for k, v in c.items() if k != "state"}),
                    "missing or malformed key 'state'"),
    "widened flipped": (edited(widened=False), "differs from source_dtype int8 but widened is false"),
    "shape edited": (edited(shape=[64, 10]), "shape [64, 10] but the graph input is [10, 64]"),
    "qmax edited": (edited(qmax=32767), "is not a widening fgcompile makes"),
    "qmin beyond dtype": (edited(qmin=-40000), "does not fit int16"),
    "dtype edited": (edited(dtype="int8"), "dtype int8 but the graph input is int16"),
    "spec edited": (lambda c: __import__("json").dumps({**c, "spec": {**c["spec"], "m": 0}}), "its spec is invalid"),
}


@pytest.mark.parametrize("case", list(CONTRACT_EDITS))
def test_edited_contract(tmp_path, out, case):
    edit, message = CONTRACT_EDITS[case]
    set_contract(out, edit)
    all_commands_refuse(out, message, tmp_path)


def test_bias_widening_flipped_is_caught_by_the_source_check(tmp_path, out):
    import json
    from fgcompile import validate
    from fgcompile.runtime import checkpoint
    set_contract(out, lambda c: json.dumps({**c, "state": [c["state"][0], {**c["state"][1], "widened": False}]}))
    refused(invoke("eval", out, "--data", TRAIN), "state.npz: belongs to another compile")   # train.onnx changed
    # bound to the edited train.onnx, the state passes that check and the source check catches the edit
    checkpoint.save(out / "state.npz", checkpoint.load(out / "state.npz")[0],
                    {"step": 0, "train_sha256": validate.file_sha256(out / "train.onnx")})
    refused(invoke("export", out, "-o", tmp_path / "a.onnx"), "does not match the contract")
    assert not (tmp_path / "a.onnx").exists()


def checkpoint_from(tmp_path, *compile_args, name="other"):
    other = tmp_path / name
    assert invoke("compile", *compile_args, "-o", other).exit_code == 0
    assert invoke("train", other, "--data", TRAIN, "--epochs", 1, "--quiet").exit_code == 0
    return other / "checkpoint.npz"


def test_checkpoint_of_a_bits_8_compile(tmp_path, trained):
    shutil.copy(checkpoint_from(tmp_path, CNN, "--bits", "8", "--headroom", "1"), trained / "checkpoint.npz")
    all_commands_refuse(trained, "is int8 [10, 64] but the graph trains int16 [10, 64]", tmp_path)


def test_checkpoint_of_the_same_model_compiled_again(tmp_path, trained):
    shutil.copy(checkpoint_from(tmp_path, CNN, "--seed", "5"), trained / "checkpoint.npz")
    all_commands_refuse(trained, "belongs to another compile (it records a different train.onnx)", tmp_path)


def test_state_of_another_model(tmp_path, out):
    assert invoke("compile", ATTN, "-o", tmp_path / "attn").exit_code == 0
    shutil.copy(tmp_path / "attn" / "state.npz", out / "state.npz")
    all_commands_refuse(out, "does not hold this compiled graph's state", tmp_path)


def test_checkpoint_with_wrong_shapes_or_values(tmp_path, trained):
    from fgcompile.runtime import checkpoint
    state, meta = checkpoint.load(trained / "checkpoint.npz")
    name = next(k for k in state if state[k].ndim == 2)
    checkpoint.save(trained / "checkpoint.npz", {**state, name: state[name][:, :10]}, meta)
    all_commands_refuse(trained, "but the graph trains int16 [10, 64]", tmp_path)
    checkpoint.save(trained / "checkpoint.npz", {**state, name: np.full_like(state[name], 32767)}, meta)
    all_commands_refuse(trained, "outside its grid [-32768, 32512]", tmp_path)


# ------------------------------------------------------------------------------------------------------------
# Hangs and resources: only regular files, bounded sizes

@pytest.fixture
def no_hang():
    import signal

    def fail(*_):
        raise AssertionError("blocked: a FIFO or device was read")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_fifo_and_device_inputs_are_refused(tmp_path, compiled, no_hang):
    fifo = tmp_path / "m.onnx"
    os.mkfifo(fifo)
    (tmp_path / "zero.onnx").symlink_to("/dev/zero")
    (tmp_path / "zero.npz").symlink_to("/dev/zero")
    for model, kind in ((fifo, "is a FIFO"), (tmp_path / "zero.onnx", "is a character device")):
        refused(invoke("compile", model, "-o", tmp_path / "out"), kind)
        refused(invoke("inspect", model), kind)
        refused(invoke("eval", model, "--data", TRAIN), kind)
    refused(invoke("eval", CNN, "--data", tmp_path / "zero.npz"), "is a character device")
    refused(invoke("train", compiled, "--data", fifo, "--quiet"), "is a FIFO")
    assert not (tmp_path / "out").exists()


def test_model_over_the_protobuf_limit(tmp_path):
    big = tmp_path / "big.onnx"
    with open(big, "wb") as f:
        f.truncate(2 ** 31 + 10)   # sparse: no disk used
    refused(invoke("compile", big, "-o", tmp_path / "out"), "over the 2 GiB limit of an ONNX protobuf file. Save "
                                                            "the weights as external data")


def npz_member(name, header_shape, dtype="<f4", payload=b"", compress=False):
    """One .npy member with a hand-written header (the data need not match it)."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros(0, np.float32))
    header.update(shape=header_shape, descr=dtype)
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return name + ".npy", buf.getvalue() + payload


def write_zip(path, members, compress=False):
    import zipfile
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def test_npz_declaring_64_gib(tmp_path, compiled):
    bad = write_zip(tmp_path / "huge.npz", [npz_member("x", (2 ** 34, 1, 8, 8)), npz_member("y", (4,), "<i8")])
    assert bad.stat().st_size < 2000
    refused(invoke("train", compiled, "--data", bad, "--quiet"), "array 'x' declares shape [17179869184, 1, 8, 8]")


def test_npz_zip_bomb(tmp_path, compiled, monkeypatch):
    from fgcompile import npzfile
    monkeypatch.setattr(npzfile, "RATIO_FLOOR", 2 ** 20)   # the real floor is 64 MiB; same rule, smaller file
    n = 2 ** 21 // 256
    x = np.zeros((n, 1, 8, 8), np.float32)
    np.savez_compressed(tmp_path / "bomb.npz", x=x, y=np.zeros(n, np.int64))
    refused(invoke("train", compiled, "--data", tmp_path / "bomb.npz", "--quiet"), "refusing a likely zip bomb")


def test_npz_reads_only_x_and_y(tmp_path):
    d = np.load(TRAIN)
    import io
    buf = io.BytesIO()
    np.save(buf, d["x"])
    xs = buf.getvalue()
    buf = io.BytesIO()
    np.save(buf, d["y"])
    members = [("x.npy", xs), ("y.npy", buf.getvalue()), npz_member("junk", (2 ** 40,), payload=b"\0" * 8)]
    r = invoke("eval", CNN, "--data", write_zip(tmp_path / "d.npz", members))
    assert r.exit_code == 0 and "(500 samples)" in r.output, r.output


def batch_inputs(tmp_path, names):
    src = tmp_path / "in"
    src.mkdir()
    for name in names:
        shutil.copy(CNN, src / name)
    return src


def test_batch_jobs_must_be_positive(tmp_path):
    src = batch_inputs(tmp_path, ["a.onnx"])
    for jobs in ("0", "-3"):
        refused(invoke("batch", src, "-o", tmp_path / "out", "--jobs", jobs), f"--jobs {jobs}: must be at least 1")
    assert not (tmp_path / "out").exists()


def test_batch_turns_crashes_hangs_and_odd_names_into_rows(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys
    from fgcompile import batch
    src = batch_inputs(tmp_path, ["good.onnx", "summary.json.onnx", "killed.onnx", "hangs.onnx"])
    os.mkfifo(src / "pipe.onnx")
    started, real_start = [], batch._start

    def start(model, out, spec, force, scratch):   # two models stand in for an OOM kill and a hang
        alive = sum(p.poll() is None for p in started)
        assert alive < 2, "more children than CPUs/--jobs"
        if model.name in ("killed.onnx", "hangs.onnx"):
            code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)" if model.name == "killed.onnx" else \
                "import time; time.sleep(60)"
            proc = subprocess.Popen([sys.executable, "-c", code])
            started.append(proc)
            return proc, __import__("time").monotonic(), scratch / f"{model.name}.json"
        proc, t0, result = real_start(model, out, spec, force, scratch)
        started.append(proc)
        return proc, t0, result
    monkeypatch.setattr(batch, "_start", start)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    r = invoke("batch", src, "-o", tmp_path / "out", "--jobs", 64, "--timeout", 8, "--m", 1)
    assert r.exit_code == 1 and r.exception is None or isinstance(r.exception, SystemExit), (r.output, r.exception)
    rows = {row["model"]: row for row in json.loads((tmp_path / "out" / "summary.json").read_text())}
    assert rows["good.onnx"]["status"] == rows["summary.json.onnx"]["status"] == "ok"
    assert (tmp_path / "out" / "summary.json_model" / "train.onnx").is_file()
    assert "killed by signal SIGKILL" in rows["killed.onnx"]["error"]
    assert "stopped after the --timeout of 8 s" in rows["hangs.onnx"]["error"]
    assert "is a FIFO" in rows["pipe.onnx"]["error"]
    assert all(p.poll() is not None for p in started)


def test_batch_ctrl_c_stops_and_writes_the_summary(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys
    import time
    from fgcompile import batch
    src = batch_inputs(tmp_path, ["a_fast.onnx", "b_slow.onnx", "c_queued.onnx"])
    started, real_start, done, real_sleep = [], batch._start, [], time.sleep

    def start(model, out, spec, force, scratch):
        if model.name == "b_slow.onnx":
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            started.append(proc)
            return proc, time.monotonic(), scratch / "none.json"
        return real_start(model, out, spec, force, scratch)

    def pause():   # Ctrl-C arrives once the fast model has finished
        if done:
            raise KeyboardInterrupt
        real_sleep(0.05)
    monkeypatch.setattr(batch, "_start", start)
    monkeypatch.setattr(batch, "_pause", pause)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    t0 = time.monotonic()
    rows, interrupted = batch.batch_compile(src, tmp_path / "out", batch.TrainSpec(m=1), jobs=2,
                                            on_done=done.append)
    assert interrupted and time.monotonic() - t0 < 30
    saved = {r["model"]: r["status"] for r in json.loads((tmp_path / "out" / "summary.json").read_text())}
    assert saved == {"a_fast.onnx": "ok", "b_slow.onnx": "cancelled"}
    assert started[0].poll() is not None   # the running child was stopped


# ------------------------------------------------------------------------------------------------------------
# Former tracebacks, now clear errors (exit 2) or working

def data_file(tmp_path, **arrays):
    np.savez(tmp_path / "d.npz", **arrays)
    return tmp_path / "d.npz"


def corrupt_compressed(tmp_path):
    d = np.load(TRAIN)
    np.savez_compressed(tmp_path / "c.npz", x=d["x"], y=d["y"])
    raw = bytearray((tmp_path / "c.npz").read_bytes())
    for i in range(2000, 2400):
        raw[i] ^= 0x5A
    (tmp_path / "c.npz").write_bytes(bytes(raw))
    return tmp_path / "c.npz"


def npy_file(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 8, 8), np.float32))
    return tmp_path / "x.npy"


DATA_TRACEBACKS = {
    "0-d x": (lambda t: data_file(t, x=np.float32(1), y=np.zeros(1, np.int64)), "x is a single number (0-d)"),
    "corrupt compressed npz": (corrupt_compressed, "not a readable .npz"),
    "npy as data": (npy_file, "is a .npy file (one array), not an .npz"),
    "object array": (lambda t: write_zip(t / "o.npz", [npz_member("x", (1,), "|O"), npz_member("y", (1,), "<i8")]),
                     "holds Python objects"),
    "truncated member": (lambda t: write_zip(t / "t.npz", [npz_member("x", (4, 1, 8, 8), payload=b"\0" * 10),
                                                           npz_member("y", (4,), "<i8", payload=b"\0" * 32)]),
                         "the file is truncated or corrupt"),
}


@pytest.mark.parametrize("case", list(DATA_TRACEBACKS))
def test_data_tracebacks(tmp_path, compiled, out, case):
    make, message = DATA_TRACEBACKS[case]
    path = make(tmp_path)
    refused(invoke("train", out, "--data", path, "--quiet"), message)
    refused(invoke("eval", CNN, "--data", path), message)
    assert snapshot(out) == snapshot(compiled)


def fixed_batch_folder(tmp_path, n=12):
    model = qdq_graphs.dense_chain(3, widths=(64, 10), batch=4)
    x = np.random.default_rng(0).uniform(0, 1, (n, 64)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(n) % 10)
    onnx.save(model, tmp_path / "m.onnx")
    assert invoke("compile", tmp_path / "m.onnx", "-o", tmp_path / "o").exit_code == 0
    return tmp_path / "o"


def test_fixed_batch_model_in_eval_and_val(tmp_path):
    out = fixed_batch_folder(tmp_path, n=11)   # 11 = two full batches of 4 and a padded one
    for target in (tmp_path / "m.onnx", out):
        r = invoke("eval", target, "--data", tmp_path / "d.npz")
        assert r.exit_code == 0 and "(11 samples)" in r.output, r.output
    r = invoke("train", out, "--data", tmp_path / "d.npz", "--val", tmp_path / "d.npz", "--batch", 4, "--epochs", 1,
               "--quiet")
    assert r.exit_code == 0 and "val_accuracy" in r.output, r.output


def test_fixed_batch_model_with_fewer_examples_than_its_batch(tmp_path):
    out = fixed_batch_folder(tmp_path, n=12)
    np.savez(tmp_path / "few.npz", x=np.zeros((3, 64), np.float32), y=np.zeros(3, np.int64))
    refused(invoke("train", out, "--data", tmp_path / "few.npz", "--batch", 4, "--quiet"),
            "holds 3 examples, fewer than the model's fixed batch of 4")


def matmul_per_input_channel(tmp_path):
    c = qdq_graphs.Chain(np.random.default_rng(0))
    h = c.qdq("x", 1 / 64)
    w, _ = c.weight((6, 5), np.int8, True, 0)
    h = c.qdq(c.op("Add", [c.op("MatMul", [h, w]), c.bias(5, 1 / 64, np.float32(0.01))]), 1 / 16)
    onnx.save(qdq_graphs._model(c, "x", ["batch", 6], h, ["batch", 5]), tmp_path / "m.onnx")
    return tmp_path / "m.onnx"


FLAG_TRACEBACKS = {
    "--checkpoint-every 0": (["train", "{out}", "--data", TRAIN, "--checkpoint-every", "0", "--quiet"],
                             "--checkpoint-every 0: must be at least 1"),
    "--train '('": (["compile", CNN, "-o", "{new}", "--train", "("], "--train '(': not a valid regular expression"),
    "--seed 2**63-1": (["compile", CNN, "-o", "{new}", "--seed", str(2 ** 63 - 1)], "must be in [0, 2**32)"),
    "inspect --m -5": (["inspect", CNN, "--m", "-5"], "--m -5: the number of perturbations must be 1..64"),
    "eval OUT/eval.onnx": (["eval", "{out}/eval.onnx", "--data", TRAIN], "pass the folder instead"),
    "MatMul per-channel on axis 0": (["compile", matmul_per_input_channel, "-o", "{new}"],
                                     "is quantized per channel on axis 0 (6 channels) but its bias"),
}


@pytest.mark.parametrize("case", list(FLAG_TRACEBACKS))
def test_former_tracebacks(tmp_path, out, case):
    args, message = FLAG_TRACEBACKS[case]
    args = [a(tmp_path) if callable(a) else str(a).format(out=out, new=tmp_path / "new") for a in args]
    before = snapshot(tmp_path)
    refused(invoke(*args), message)
    assert snapshot(tmp_path) == before and not (tmp_path / "new").exists()


def test_a_compiled_folder_from_before_markers_is_still_replaceable(tmp_path, compiled):
    out = tmp_path / "old"
    shutil.copytree(compiled, out)
    for hidden in (".fgcompile-folder", ".fgcompile.lock"):
        (out / hidden).unlink()
    assert invoke("compile", CNN, "-o", out, "--m", 2).exit_code == 0
    (out / ".fgcompile-folder").unlink()
    (out / "mine.txt").write_text("not a compiled layout")
    refused(invoke("compile", CNN, "-o", out), "was not written by fgcompile")


def test_the_lock_holder_is_another_process(out):
    import subprocess
    import sys
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from fgcompile import folder
with folder.locked({str(out)!r}):
    print("locked", flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused(invoke("train", out, "--data", TRAIN, "--quiet", "--epochs", 1),
                f"another fgcompile process (pid {holder.pid}) is using this folder")
        assert not (out / "checkpoint.npz").exists()
    finally:
        holder.kill()
        holder.wait()
    assert invoke("train", out, "--data", TRAIN, "--quiet", "--epochs", 1).exit_code == 0   # released on exit
