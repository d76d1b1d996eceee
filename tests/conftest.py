import pathlib
import sys

import numpy as np
import pytest

from fgcompile import models
from fgcompile.modelio import load_model

MODELS = models.ROOT
BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))   # the benchmark modules are scripts, not an installed package


def pytest_configure(config):
    # also outside the checkout (CI's wheel job), where pyproject's marker list is not read
    config.addinivalue_line("markers", "slow: rebuilds and heavy measurements; deselected by default")
    config.addinivalue_line("markers", "cdriver: the example C driver (examples/c); skipped without cc and onnxruntime's "
                                       "C headers (.ci/c-driver installs them)")


@pytest.fixture(scope="session")
def target_train():
    d = np.load(MODELS / "data" / "digits_target_train.npz")
    return d["x"], d["y"]


@pytest.fixture(scope="session")
def target_test():
    d = np.load(MODELS / "data" / "digits_target_test.npz")
    return d["x"], d["y"]


def shipped(name: str):
    return load_model(MODELS / name)


@pytest.fixture
def tmp_out(tmp_path) -> pathlib.Path:
    return tmp_path / "out"
