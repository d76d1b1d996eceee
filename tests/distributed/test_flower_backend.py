"""fleet --backend flower: the federated rounds on Flower's simulation engine (its Ray backend) write the
local backend's federated model and report byte for byte; an address that does not answer is refused
before anything is written. Without the fleet extra (flwr and ray) the tests skip.

The engine uses the Ray cluster at RAY_ADDRESS when it is set (CI starts one with `ray start --head`), else a
local instance.
"""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import MODELS
from fgcompile.cli import main

flwr = pytest.importorskip("flwr", reason="the fleet extra is not installed (pip install 'fgcompile[fleet]')")
pytest.importorskip("ray", reason="the fleet extra is not installed (pip install 'fgcompile[fleet]')")


CNN = MODELS / "digits_cnn" / "w8a8.onnx"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """3 devices of the shipped digits fleet."""
    f = dict(np.load(MODELS / "data" / "fleet_digits.npz"))
    keep = f["device"] < 3
    path = tmp_path_factory.mktemp("fleet") / "fleet.npz"
    np.savez(path, **{k: f[k][keep] for k in ("x", "y", "device", "split")})
    return path.parent


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    return r


def test_flower_rounds_equal_the_local_ones(tmp_path, small, monkeypatch):
    """With relative paths too: the workers of a running cluster work in their own folder."""
    args = ["--rounds", 2, "--m", 8, "--lr", 8, "--modes", "federated", "--json"]
    local = invoke("fleet", CNN, "--data", small / "fleet.npz", *args, "-o", tmp_path / "local")
    (tmp_path / "fleet.npz").write_bytes((small / "fleet.npz").read_bytes())
    monkeypatch.chdir(tmp_path)
    flower = invoke("fleet", CNN, "--data", "fleet.npz", *args, "-o", "flower", "--backend", "flower")
    assert local.exit_code == 0 and flower.exit_code == 0, flower.output
    a, b = json.loads(local.output), json.loads(flower.output)
    assert b.pop("backend") == "flower" and a.pop("backend") == "local"
    a.pop("federated_model"), b.pop("federated_model")
    assert a == b
    assert (tmp_path / "local" / "federated.onnx").read_bytes() == (tmp_path / "flower" / "federated.onnx").read_bytes()
    weights = lambda path: {i.name: i.raw_data for i in onnx.load(str(path)).graph.initializer}
    assert weights(tmp_path / "flower" / "federated.onnx") != weights(CNN)   # the rounds moved the model


def test_an_address_that_does_not_answer_is_refused_first(tmp_path, small):
    r = invoke("fleet", CNN, "--data", small / "fleet.npz", "-o", tmp_path / "f", "--backend", "flower",
               "--address", "127.0.0.1:9")
    assert r.exit_code == 2 and "cannot connect" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "f").exists()
