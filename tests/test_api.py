"""The top-level API works in memory: compile a ModelProto, train it without a folder, export a
ModelProto, and matches the folder workflow bit for bit; run_fleet is the fleet command."""
import json

import numpy as np

import fgcompile
from conftest import MODELS, shipped
from fgcompile.session import make_session

DATA = MODELS / "data" / "digits_target_train.npz"


def test_in_memory_matches_the_folder_workflow(tmp_path, target_train):
    source = shipped("digits_cnn/w8a8.onnx")
    spec = fgcompile.TrainSpec(m=2)
    compiled = fgcompile.compile_model(source, spec)
    trainer = fgcompile.Trainer(compiled, session=fgcompile.SessionSettings(threads=1, optimization="disable"))
    history = trainer.fit(target_train, epochs=1, batch=64, progress=False)
    assert len(history) == 1 and not list(tmp_path.iterdir())
    adapted, report = fgcompile.export_model(trainer)
    assert set(report) == {s.name for s in compiled.contract.state}

    fgcompile.write_compiled(fgcompile.compile_model(source, spec), tmp_path / "out")
    on_disk = fgcompile.Trainer(tmp_path / "out", session=fgcompile.SessionSettings(optimization="disable"))
    on_disk.fit(str(DATA), epochs=1, batch=64, progress=False)
    for name, value in on_disk.state.items():
        np.testing.assert_array_equal(trainer.state[name], value)
    assert any((trainer.state[n] != compiled.state[n]).any() for n in compiled.state), "training moved W"
    fgcompile.export_model(tmp_path / "out", tmp_path / "adapted.onnx")
    x = target_train[0][:64]
    run = lambda m: make_session(m).run(None, {"x": x})[0]
    np.testing.assert_array_equal(run(adapted), run(str(tmp_path / "adapted.onnx")))


def test_session_settings_refuse_unknown_values():
    import pytest
    for bad in (dict(optimization="max"), dict(provider="NoSuchExecutionProvider"), dict(threads=-1)):
        with pytest.raises(fgcompile.api.SpecError):
            fgcompile.SessionSettings(**bad)


def test_run_fleet_is_the_command(tmp_path):
    """fgcompile.run_fleet returns the report `fgcompile fleet` writes, and writes nothing else but OUT."""
    f = dict(np.load(MODELS / "data" / "fleet_digits.npz"))
    keep = f["device"] < 2
    np.savez(tmp_path / "fleet.npz", **{k: f[k][keep] for k in ("x", "y", "device", "split")})
    report = fgcompile.run_fleet(MODELS / "digits_cnn" / "w8a8.onnx", tmp_path / "fleet.npz", tmp_path / "out",
                                 rounds=1, lr=2048, modes=["federated"], spec=fgcompile.TrainSpec(m=8),
                                 echo=lambda s: None)
    assert report == json.loads((tmp_path / "out" / "fleet.json").read_text())
    assert [d["device"] for d in report["devices"]] == [0, 1] and report["upload"]["kind"] == "signs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet.npz", "out"]
