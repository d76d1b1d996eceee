"""Bad data files give a clear error that names the array and the fix."""
import numpy as np
import pytest

from conftest import MODELS
from fgcompile.errors import DataError
from fgcompile.runtime.data import load_data

SHAPE, CLASSES = ["batch", 1, 8, 8], 10
GOOD_X, GOOD_Y = np.zeros((4, 1, 8, 8), np.float32), np.array([0, 1, 2, 9])


def save(tmp_path, **arrays):
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize("arrays,message", [
    (dict(x=GOOD_X), "missing array 'y'"),
    (dict(y=GOOD_Y), "missing array 'x'"),
    (dict(x=np.zeros((4, 8, 8), np.float32), y=GOOD_Y), r"shape \[4, 8, 8\].*model input is \['batch', 1, 8, 8\]"),
    (dict(x=np.zeros((4, 1, 8, 8), np.int32), y=GOOD_Y), "x has dtype int32"),
    (dict(x=GOOD_X, y=np.array([0.0, 1, 2, 3])), "y has dtype float64"),
    (dict(x=GOOD_X, y=np.array([0, 1, 2, 10])), r"labels range over \[0, 10\].*10 classes"),
    (dict(x=GOOD_X, y=np.array([0, -1, 2, 3])), "labels range over"),
    (dict(x=GOOD_X, y=GOOD_Y[:3]), "y must be"),
    (dict(x=np.where(np.arange(4)[:, None, None, None] == 2, np.nan, GOOD_X).astype(np.float32), y=GOOD_Y),
     "NaN or Inf in 1 samples"),
])
def test_bad_arrays(tmp_path, arrays, message):
    with pytest.raises(DataError, match=message):
        load_data(save(tmp_path, **arrays), SHAPE, CLASSES)


def test_not_an_npz(tmp_path):
    p = tmp_path / "d.npz"
    p.write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_data(p, SHAPE, CLASSES)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_data(tmp_path / "none.npz", SHAPE, CLASSES)


def test_shipped_data_loads():
    x, y = load_data(MODELS / "data" / "digits_target_train.npz", SHAPE, CLASSES)
    assert x.dtype == np.float32 and y.dtype == np.int64 and len(x) == 500


def test_compact_codes_decode_to_float32(tmp_path):
    codes = np.array([0, 1, 255, 128], np.uint8).reshape(4, 1, 1, 1) * np.ones((1, 1, 8, 8), np.uint8)
    x, _ = load_data(save(tmp_path, x=codes, y=GOOD_Y, x_scale=np.float32(0.5), x_offset=np.float32(-1)),
                     SHAPE, CLASSES)
    assert x.dtype == np.float32 and x[:, 0, 0, 0].tolist() == [-1.0, -0.5, 126.5, 63.0]


@pytest.mark.parametrize("arrays", [dict(x=GOOD_X, x_scale=np.float32(2)),                 # float x
                                    dict(x=GOOD_X.astype(np.uint8), x_scale=np.ones(3, np.float32))])
def test_compact_codes_need_integer_x_and_scalar_scale(tmp_path, arrays):
    with pytest.raises(DataError, match="x_scale/x_offset need integer codes"):
        load_data(save(tmp_path, y=GOOD_Y, **arrays), SHAPE, CLASSES)
