"""The shipped fleet data (models/recipes/fleet_data.py): the file contract `fgcompile fleet` reads, and a
device gap for the shipped w8a8 models on every task."""
import importlib.util
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import MODELS
from fgcompile import models
from fgcompile.runtime.data import load_data
from fgcompile.session import make_session
from test_kws_recipe import digest

RECIPE = MODELS / "recipes" / "fleet_data.py"
FLEET = models.manifest()["fleet"]
DEVICES = 20
CONTRACT = {   # task: (x dtype, x shape after N, train and test examples per device, shift columns)
    "digits": (np.float32, (1, 8, 8), (60, 40), 4),
    "kws": (np.uint8, (1, 40, 49), (40, 40), 6),
}
HAS_SCIPY = importlib.util.find_spec("scipy") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None


def recipe():
    sys.path.insert(0, str(RECIPE.parent))
    import fleet_data
    return fleet_data


def device_accuracy(task: str) -> np.ndarray:
    """The shipped w8a8 model's accuracy per device on that device's test examples."""
    entry = FLEET["tasks"][task]
    x, y = load_data(models.path(entry["file"]))
    with np.load(models.path(entry["file"])) as f:
        device, split = f["device"], f["split"]
    pred = make_session(str(models.path(f"{entry['model']}/w8a8.onnx")), arithmetic=True).run(None, {"x": x})[0].argmax(1)
    return np.array([(pred == y)[(device == d) & (split == 1)].mean() for d in range(DEVICES)])


@pytest.mark.parametrize("task", CONTRACT)
def test_fleet_file_matches_the_contract(task):
    dtype, shape, (n_train, n_test), k = CONTRACT[task]
    path = models.path(FLEET["tasks"][task]["file"])
    assert path.stat().st_size == FLEET["tasks"][task]["bytes"] < 4 * 2 ** 20
    with np.load(path) as f:
        a = {name: f[name] for name in f.files}
    assert set(a) == {"x", "y", "device", "split", "shift", "shift_names"} | ({"x_scale"} if task == "kws" else set())
    n = len(a["y"])
    assert a["x"].dtype == dtype and a["x"].shape == (n, *shape)
    assert a["y"].dtype == np.int64 and a["device"].dtype == np.int16 and a["split"].dtype == np.uint8
    assert a["device"].shape == a["split"].shape == (n,) and set(np.unique(a["split"])) == {0, 1}
    assert a["shift"].dtype == np.float32 and a["shift"].shape == (DEVICES, k) and np.isfinite(a["shift"]).all()
    assert a["shift_names"].dtype.kind == "U" and a["shift_names"].tolist() == FLEET["tasks"][task]["shift_names"]
    if task == "kws":
        assert a["x_scale"].dtype == np.float32 and a["x_scale"].shape == () and a["x_scale"] == np.float32(1 / 255)
    else:
        assert a["x"].min() >= 0.0 and a["x"].max() <= 1.0
    assert np.array_equal(np.unique(a["device"]), np.arange(DEVICES))
    for d in range(DEVICES):
        for s, count in enumerate((n_train, n_test)):
            y = a["y"][(a["device"] == d) & (a["split"] == s)]
            assert len(y) == count, (d, s)
            per_class = np.bincount(y, minlength=10)
            assert len(per_class) == 10 and per_class.max() - per_class.min() <= 1, (d, s, per_class)
        train, test = (a["x"][(a["device"] == d) & (a["split"] == s)].reshape(-1, np.prod(shape)) for s in (0, 1))
        # the same underlying example on both sides would (noise aside) show as a repeated row
        assert not {r.tobytes() for r in train} & {r.tobytes() for r in test}, d


@pytest.mark.parametrize("task", CONTRACT)
def test_shipped_model_loses_accuracy_on_every_fleet(task):
    """The manifest's per-device accuracies hold, and the fleet is a device gap: on average >= 20 points
    below the model's source test accuracy, and no device above it."""
    entry = FLEET["tasks"][task]
    got = device_accuracy(task)
    assert np.allclose(got, entry["w8a8_test_accuracy"], atol=0.026), got   # one example of 40
    xs, ys = models.split(entry["model"], "source_test")
    source = (make_session(str(models.path(f"{entry['model']}/w8a8.onnx")), arithmetic=True).run(None, {"x": xs})[0].argmax(1)
              == ys).mean()
    assert source - got.mean() >= 0.20 and got.max() < source, (source, got)


@pytest.mark.skipif(not (HAS_SCIPY and HAS_SKLEARN), reason="the recipe's digits pool needs scipy and scikit-learn")
def test_digits_pool_is_the_shipped_target_and_splits_are_disjoint():
    """fleet_data's copy of build_zoo's split, through build_zoo's shift (20°, gain 0.8, black 0.15, no noise),
    is digits_target_{train,test} bit for bit; every device draws its train and test from those two pools, and
    its file labels are the pool's."""
    fleet = recipe()
    pool = fleet.digits_target_pool()
    for split in ("train", "test"):
        x, y = load_data(MODELS / "data" / f"digits_target_{split}.npz")
        assert np.array_equal(fleet.sensor_view(pool[split][0], 20.0, 0.8, 0.15, 0.0, np.random.default_rng(0))[:, None], x)
        assert np.array_equal(pool[split][1], y)
    with np.load(models.path(FLEET["tasks"]["digits"]["file"])) as f:
        y, device, split, shift = f["y"], f["device"], f["split"], f["shift"]
    for d in range(DEVICES):
        params, picks = fleet.digits_device(d, pool)
        assert np.array_equal(np.float32(params), shift[d])
        for s, name in enumerate(("train", "test")):
            assert len(set(picks[name])) == len(picks[name])
            assert np.array_equal(pool[name][1][picks[name]], y[(device == d) & (split == s)])


@pytest.mark.skipif(not HAS_SCIPY, reason="kws_data needs scipy")
def test_kws_speakers_are_target_speakers_on_one_device_each():
    fleet = recipe()
    assigned = fleet.kws_speakers()
    seeds = [s["seed"] for split in assigned.values() for device in split for s in device]
    assert len(seeds) == len(set(seeds)) == DEVICES * 8
    for split, devices in assigned.items():
        assert all(s["domain"] == "target" and s["split"] == split for device in devices for s in device)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None or not (HAS_SCIPY and HAS_SKLEARN),
                    reason="the recipe needs espeak-ng (apt-get install espeak-ng), scipy and scikit-learn")
def test_recipe_rebuilds_the_shipped_fleet(tmp_path):
    subprocess.run([sys.executable, str(RECIPE), str(tmp_path)], check=True, capture_output=True, timeout=600)
    for task, entry in FLEET["tasks"].items():
        assert digest(tmp_path / f"fleet_{task}.npz") == digest(models.path(entry["file"])), task
