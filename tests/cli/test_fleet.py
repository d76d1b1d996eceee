"""`fgcompile fleet`: per-device accuracy before and after each mode, what --source keeps, the bytes uploaded;
the exported federated model scores what the report says; the fleet data file's and the options' bad input
is refused with one clear error before anything is written."""
import json
import sys

import numpy as np
import pytest

from conftest import MODELS
from fgcompile.runtime.trainer import Trainer
from test_adapt import fifo
from test_bad_input_catalogue import CNN, invoke, refused, snapshot

DATA = MODELS / "data"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The first 3 devices of the shipped digits fleet, 24 train and 16 test examples each."""
    root = tmp_path_factory.mktemp("fleet")
    f = dict(np.load(DATA / "fleet_digits.npz"))
    keep = np.zeros(len(f["y"]), bool)
    for d in range(3):
        for split, n in ((0, 24), (1, 16)):
            keep[np.flatnonzero((f["device"] == d) & (f["split"] == split))[:n]] = True
    np.savez(root / "fleet.npz", **{k: f[k][keep] for k in ("x", "y", "device", "split")}, shift=f["shift"][:3],
             shift_names=f["shift_names"])
    return root


@pytest.mark.parametrize("upload, kind, estimator", [("auto", "signs", "sign"), ("update", "update", "head")])
def test_fleet_defaults_keep_signs_at_the_last_layer(tmp_path, small, upload, kind, estimator):
    """Left to auto, the fleet trains the last layer with weight perturbation, whose signs replay (the head
    estimator's exact gradient is not replayable); --upload update keeps auto's head estimator."""
    r = invoke("fleet", CNN, "--data", small / "fleet.npz", "--rounds", 1, "--lr", 1, "--modes", "federated",
               "--upload", upload, "-o", tmp_path / "f", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["upload"]["kind"] == kind
    assert Trainer(tmp_path / "f" / "compiled").contract.spec.estimator == estimator


def test_fleet_reports_every_device_and_exports_the_federated_model(tmp_path, small):
    r = invoke("fleet", CNN, "--data", small / "fleet.npz", "--rounds", 2, "--m", 8, "--lr", 8, "--source",
               DATA / "digits_source_test.npz", "-o", tmp_path / "f", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["modes"] == ["before", "alone", "federated", "centralized"]
    assert [d["device"] for d in report["devices"]] == [0, 1, 2] and set(report["devices"][0]["shift"]) == \
        {"angle_deg", "gain", "black_level", "noise_std"}
    up = report["upload"]
    assert up["kind"] == "signs" and up["m"] == 8 and up["steps_per_round"] == 3
    assert up["bits_per_step"] >= 8 and up["bytes_per_round"] >= 3 and up["update_bytes_per_round"] > up["bytes_per_round"]
    assert json.loads((tmp_path / "f" / "fleet.json").read_text()) == report
    f = np.load(small / "fleet.npz")
    for row in report["devices"]:
        test = tmp_path / f"d{row['device']}.npz"
        mask = (f["device"] == row["device"]) & (f["split"] == 1)
        np.savez(test, x=f["x"][mask], y=f["y"][mask])
        for model, mode in ((CNN, "before"), (tmp_path / "f" / "federated.onnx", "federated")):
            scored = json.loads(invoke("eval", model, "--data", test, "--json").output)["accuracy"]
            assert abs(scored - row[mode]) < 1e-9, (row, mode, scored)
    assert report["source"]["before"] == pytest.approx(0.965)
    # a second run replaces its own folder; the text report names every device and the bytes
    r = invoke("fleet", CNN, "--data", small / "fleet.npz", "--rounds", 1, "--m", 4, "--lr", 8, "--modes",
               "federated", "-o", tmp_path / "f", "--quiet")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[1].startswith("accuracy on each device") and lines[2].split()[-2:] == ["before", "federated"]
    assert "bytes of signs" in r.output and "as weights" in r.output and not (tmp_path / "f" / "x").exists()


def test_fleet_chooses_the_rate_by_tune_when_not_given(tmp_path, small):
    r = invoke("fleet", CNN, "--data", small / "fleet.npz", "--rounds", 1, "--m", 2, "--modes", "centralized",
               "-o", tmp_path / "f", "--json")
    assert r.exit_code == 0, r.output
    tuned = json.loads((tmp_path / "f" / "compiled" / "tune.json").read_text())
    assert json.loads(r.output)["schedule"]["lr_numerator"] == tuned["choice"]["lr_numerator"]
    assert not (tmp_path / "f" / "federated.onnx").exists() and "upload" not in json.loads(r.output)


def test_replay_deals_the_source_examples_to_the_devices(tmp_path, small):
    """--replay SRC is the same as a fleet file whose device d also trains on SRC's examples d, d + N, …"""
    src = np.load(DATA / "digits_source_train.npz")
    np.savez(tmp_path / "src.npz", x=src["x"][:9], y=src["y"][:9])
    f = dict(np.load(small / "fleet.npz"))
    extra = {"x": src["x"][:9], "y": src["y"][:9], "device": np.arange(9) % 3, "split": np.zeros(9, f["split"].dtype)}
    order = np.argsort(extra["device"], kind="stable")       # each device's share after its own examples
    np.savez(tmp_path / "both.npz", **{k: np.concatenate([f[k], extra[k][order].astype(f[k].dtype)])
                                       for k in ("x", "y", "device", "split")})
    args = ["--rounds", 2, "--m", 8, "--lr", 8, "--json"]
    replay = invoke("fleet", CNN, "--data", small / "fleet.npz", "--replay", tmp_path / "src.npz", *args,
                    "-o", tmp_path / "r")
    both = invoke("fleet", CNN, "--data", tmp_path / "both.npz", *args, "-o", tmp_path / "b")
    assert replay.exit_code == 0 and both.exit_code == 0, replay.output
    a, b = json.loads(replay.output), json.loads(both.output)
    assert a.pop("replayed") == 9 and b.pop("replayed") == 0
    assert [d["train"] for d in a["devices"]] == [27, 27, 27]
    assert a["summary"] == b["summary"] and a["upload"] == b["upload"]
    assert (tmp_path / "r" / "federated.onnx").read_bytes() == (tmp_path / "b" / "federated.onnx").read_bytes()


def fleet_file(path, drop=(), **changes):
    f = dict(np.load(DATA / "fleet_digits.npz"))
    keep = f["device"] < 3
    f = {k: (v[keep] if k in ("x", "y", "device", "split") else v[:3] if k == "shift" else v) for k, v in f.items()}
    for k, v in changes.items():
        f[k] = v(f) if callable(v) else v
    np.savez(path, **{k: v for k, v in f.items() if k not in drop})
    return path


FLEET_CASES = {
    "no device ids": (lambda t: ["--data", fleet_file(t / "d.npz", drop=("device",))], "device"),
    "split of 2": (lambda t: ["--data", fleet_file(t / "d.npz", split=lambda f: f["split"] * 2)], "split holds [2]"),
    "a missing device id": (lambda t: ["--data", fleet_file(t / "d.npz", device=lambda f: f["device"] * 2)],
                            "device ids must be 0..N-1"),
    "a device without test data": (lambda t: ["--data", fleet_file(
        t / "d.npz", split=lambda f: np.where(f["device"] == 1, 0, f["split"]))], "device 1 has 100 training and 0 test"),
    "float device ids": (lambda t: ["--data", fleet_file(t / "d.npz", device=lambda f: f["device"] * 1.0)],
                         "device must be integers"),
    "shift of another shape": (lambda t: ["--data", fleet_file(t / "d.npz", shift=np.zeros((2, 4), np.float32))],
                               "shift must be [devices, K]"),
    "another model's data": (lambda t: ["--data", DATA / "kws_target_test.npz"], "device"),
    "modes unknown": (lambda t: ["--modes", "alone,solo"], "--modes 'alone,solo'"),
    "no modes": (lambda t: ["--modes", ","], "--modes"),
    "zero rounds": (lambda t: ["--rounds", 0], "--rounds 0"),
    "zero local epochs": (lambda t: ["--local-epochs", 0], "--local-epochs 0"),
    "lr of zero": (lambda t: ["--lr", 0], "--lr"),
    "address without flower": (lambda t: ["--address", "127.0.0.1:6379"], "only --backend flower"),
    "signs from node perturbation": (lambda t: ["--upload", "signs", "--estimator", "node", "--last", 2],
                                     "--upload signs: --estimator node"),
    "source of another model": (lambda t: ["--source", DATA / "kws_source_test.npz"], "model input is"),
    "missing data file": (lambda t: ["--data", t / "nope.npz"], "nope.npz"),
    "replay of another model": (lambda t: ["--replay", DATA / "kws_source_train.npz"], "model input is"),
    "replay is a FIFO": (lambda t: ["--replay", fifo(t / "pipe")], "is a FIFO"),
    "data is a folder": (lambda t: ["--data", folder(t / "dir")], "is a folder, not a fleet data file"),
    "data is a FIFO": (lambda t: ["--data", fifo(t / "pipe")], "is a FIFO"),
    "source is a folder": (lambda t: ["--source", folder(t / "dir")], "is a folder, not a data file"),
}


def folder(path):
    path.mkdir(exist_ok=True)
    return path


@pytest.mark.parametrize("case", list(FLEET_CASES))
def test_fleet_bad_input_writes_nothing(tmp_path, small, case):
    args = FLEET_CASES[case][0](tmp_path)
    base = [] if "--data" in args else ["--data", small / "fleet.npz"]
    kept = snapshot(tmp_path)
    refused(invoke("fleet", CNN, *base, "-o", tmp_path / "f", "--rounds", 1, "--m", 2, *args), FLEET_CASES[case][1])
    assert snapshot(tmp_path) == kept and not (tmp_path / "f").exists()


def test_fleet_refuses_a_folder_it_did_not_write_and_an_output_holding_its_data(tmp_path, small):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "mine.txt").write_text("the user's")
    kept = snapshot(tmp_path)
    refused(invoke("fleet", CNN, "--data", small / "fleet.npz", "-o", tmp_path / "f"), "was not written by fgcompile")
    inside = tmp_path / "g"
    inside.mkdir()
    data = fleet_file(inside / "fleet.npz")
    kept = snapshot(tmp_path)
    refused(invoke("fleet", CNN, "--data", data, "-o", inside), "holds the input")
    assert snapshot(tmp_path) == kept


def test_fleet_refuses_an_output_that_is_the_users_file(tmp_path, small):
    (tmp_path / "f").write_text("the user's")
    refused(invoke("fleet", CNN, "--data", small / "fleet.npz", "-o", tmp_path / "f"), "exists and is not a folder")
    assert (tmp_path / "f").read_text() == "the user's"


def test_flower_backend_without_flower_says_how_to_install(tmp_path, small, monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr", None)   # as if the extra were not installed
    refused(invoke("fleet", CNN, "--data", small / "fleet.npz", "-o", tmp_path / "f", "--backend", "flower"),
            "pip install 'fgcompile[fleet]'")
    assert not (tmp_path / "f").exists()


def test_a_fixed_batch_model_trains_at_its_batch_on_devices_that_hold_one(tmp_path):
    import onnx
    import qdq_graphs
    onnx.save(qdq_graphs.dense_chain(3, widths=(64, 10), batch=4), tmp_path / "m.onnx")
    x = np.random.default_rng(0).uniform(0, 1, (20, 64)).astype(np.float32)
    device, split = np.repeat([0, 1], 10), np.tile([0] * 6 + [1] * 4, 2)
    np.savez(tmp_path / "f.npz", x=x, y=np.arange(20) % 10, device=device, split=split)
    refused(invoke("fleet", tmp_path / "m.onnx", "--data", tmp_path / "f.npz", "-o", tmp_path / "o"),
            "fixed at 4. Pass --batch 4")
    few = np.concatenate([split[:10], [0] * 3 + [1] * 7])   # device 1 trains on 3 examples
    np.savez(tmp_path / "g.npz", x=x, y=np.arange(20) % 10, device=device, split=few)
    refused(invoke("fleet", tmp_path / "m.onnx", "--data", tmp_path / "g.npz", "-o", tmp_path / "o", "--batch", 4),
            "device 1 holds fewer training examples than the model's fixed batch of 4")
    assert not (tmp_path / "o").exists()
    r = invoke("fleet", tmp_path / "m.onnx", "--data", tmp_path / "f.npz", "-o", tmp_path / "o", "--batch", 4,
               "--rounds", 1, "--lr", 1, "--m", 2)
    assert r.exit_code == 0, r.output
