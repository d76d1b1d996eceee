import pathlib

import numpy as np
import pytest

from fgcompile import models
from fgcompile.modelio import load_model

MODELS = models.ROOT


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
