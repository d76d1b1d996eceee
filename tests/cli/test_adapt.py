"""`fgcompile adapt` is the documented chain (compile with the data as calibration, tune at the epochs it
trains, train, export), bit for bit; --replay is the same as training on the concatenated file; the demo's
--quiet prints the table and the files only; adapt's bad input is refused before anything is written."""
import json
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import MODELS
from test_bad_input_catalogue import CNN, invoke, refused, snapshot

DATA = MODELS / "data"


def weights(path) -> dict:
    return {i.name: numpy_helper.to_array(i).tobytes() for i in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """96 target-train examples, 64 source-train examples, and the two concatenated (target first)."""
    root = tmp_path_factory.mktemp("adapt")
    t, s = np.load(DATA / "digits_target_train.npz"), np.load(DATA / "digits_source_train.npz")
    np.savez(root / "target.npz", x=t["x"][:96], y=t["y"][:96])
    np.savez(root / "source.npz", x=s["x"][:64], y=s["y"][:64])
    np.savez(root / "both.npz", x=np.concatenate([t["x"][:96], s["x"][:64]]), y=np.concatenate([t["y"][:96], s["y"][:64]]))
    return root


def test_adapt_is_compile_tune_train_export(tmp_path, small):
    r = invoke("adapt", CNN, "--data", small / "target.npz", "--epochs", 2, "-o", tmp_path / "a", "--m", 4,
               "--val", DATA / "digits_target_test.npz", "--source", DATA / "digits_source_test.npz")
    assert r.exit_code == 0, r.output
    table = r.output[r.output.index("split "):].splitlines()
    assert table[1].startswith("target_test  59.26%") and table[2].startswith("source_test  96.50%"), r.output
    chain = tmp_path / "chain"
    steps = [("compile", CNN, "-o", chain, "--m", 4, "--calibration", small / "target.npz"),
             ("tune", chain, "--data", small / "target.npz", "--epochs", 2),
             ("train", chain, "--data", small / "target.npz", "--epochs", 2, "--quiet"),
             ("export", chain, "-o", tmp_path / "chain.onnx")]
    for step in steps:
        assert invoke(*step).exit_code == 0, step
    assert weights(tmp_path / "a" / "adapted.onnx") == weights(tmp_path / "chain.onnx")
    assert (tmp_path / "a" / "training.png").stat().st_size > 0


def test_replay_is_training_on_the_concatenation(tmp_path, small):
    common = ("--epochs", 1, "--m", 2, "--json")
    r1 = invoke("adapt", CNN, "--data", small / "target.npz", "--replay", small / "source.npz", "-o", tmp_path / "r",
                *common)
    r2 = invoke("adapt", CNN, "--data", small / "both.npz", "-o", tmp_path / "b", *common)
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    one, two = json.loads(r1.output), json.loads(r2.output)
    assert one["examples"] == {"trained": 160, "replayed": 64} and two["examples"]["replayed"] == 0
    assert weights(tmp_path / "r" / "adapted.onnx") == weights(tmp_path / "b" / "adapted.onnx")
    assert one["lr"] == two["lr"]


def test_train_and_tune_replay_match_the_concatenated_file(tmp_path, small):
    for name in ("r", "b"):
        assert invoke("compile", CNN, "-o", tmp_path / name, "--m", 2).exit_code == 0
    assert invoke("tune", tmp_path / "r", "--data", small / "target.npz", "--replay", small / "source.npz",
                  "--epochs", 1).exit_code == 0
    assert invoke("tune", tmp_path / "b", "--data", small / "both.npz", "--epochs", 1).exit_code == 0
    assert json.loads((tmp_path / "r" / "tune.json").read_text())["scores"] == \
        json.loads((tmp_path / "b" / "tune.json").read_text())["scores"]
    for name, data in (("r", ["--data", small / "target.npz", "--replay", small / "source.npz"]),
                       ("b", ["--data", small / "both.npz"])):
        assert invoke("train", tmp_path / name, *data, "--epochs", 1, "--quiet").exit_code == 0
    ckpt = lambda n: dict(np.load(tmp_path / n / "checkpoint.npz"))
    a, b = ckpt("r"), ckpt("b")
    assert [k for k in a if not k.startswith("_")] and all(np.array_equal(a[k], b[k]) for k in a if not k.startswith("_"))
    # resuming needs the same replay: without it the data changed
    r = invoke("train", tmp_path / "r", "--data", small / "target.npz", "--epochs", 2, "--resume")
    assert r.exit_code == 2 and "data" in r.output, r.output


def test_demo_quiet_prints_the_table_and_the_files(tmp_path):
    r = invoke("demo", "-o", tmp_path / "d", "--epochs", 1, "--quiet", "--no-replay")
    assert r.exit_code == 0, r.output
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert lines[0].startswith("split") and len(lines) == 5, r.output   # head, 2 rows, exported, plot


ADAPT_CASES = {
    "replay of another model's input": (lambda s: ["--replay", DATA / "kws_target_test.npz"], "model input is"),
    "replay labels out of range": (lambda s: ["--replay", s / "bad_labels.npz"], "labels range"),
    "missing replay file": (lambda s: ["--replay", s / "nope.npz"], "nope.npz"),
    "source of another model": (lambda s: ["--source", DATA / "kws_source_test.npz"], "model input is"),
    "zero epochs": (lambda s: ["--epochs", 0], "--epochs 0"),
    "replay is a folder": (lambda s: ["--replay", s], "is a folder, not a data file"),
    "replay is a FIFO": (lambda s: ["--replay", fifo(s / "pipe")], "is a FIFO"),
}


def fifo(path):
    if not path.exists():
        os.mkfifo(path)
    return path


@pytest.mark.parametrize("case", list(ADAPT_CASES))
def test_adapt_bad_input_writes_nothing(tmp_path, small, case):
    np.savez(small / "bad_labels.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 3, 11, 2]))
    args, message = ADAPT_CASES[case]
    r = invoke("adapt", CNN, "--data", small / "target.npz", "-o", tmp_path / "a", *args(small))
    refused(r, message)
    assert not (tmp_path / "a").exists()


def test_adapt_refuses_a_folder_it_did_not_write(tmp_path, small):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine.txt").write_text("the user's")
    kept = snapshot(tmp_path)
    r = invoke("adapt", CNN, "--data", small / "target.npz", "-o", tmp_path / "a", "--epochs", 1)
    refused(r, "was not written by fgcompile")
    assert snapshot(tmp_path) == kept


def test_eval_reports_each_data_file(tmp_path):
    target, source = DATA / "digits_target_test.npz", DATA / "digits_source_test.npz"
    r = invoke("eval", CNN, "--data", target, "--data", source, "--json")
    assert r.exit_code == 0, r.output
    both = json.loads(r.output)["results"]
    alone = [json.loads(invoke("eval", CNN, "--data", d, "--json").output) for d in (target, source)]
    assert [b.pop("data") for b in both] == [str(target), str(source)] and both == alone
    assert abs(alone[0]["accuracy"] - 0.5926) < 1e-4 and abs(alone[1]["accuracy"] - 0.965) < 1e-4
    text = invoke("eval", CNN, "--data", target, "--data", source).output.splitlines()
    assert len(text) == 2 and text[1].startswith(str(source)) and "accuracy 0.9650" in text[1]
    refused(invoke("eval", CNN, "--data", target, "--data", DATA / "kws_source_test.npz"), "model input is")


def test_adapt_refuses_an_output_that_is_a_file(tmp_path, small):
    (tmp_path / "a").write_text("the user's")
    refused(invoke("adapt", CNN, "--data", small / "target.npz", "-o", tmp_path / "a"), "exists and is not a folder")
    assert (tmp_path / "a").read_text() == "the user's"
