"""Data files: .npz with `x` (shaped like the model input: float32, or integers such as token ids for a
model whose input is integer) and `y` (int64 class labels).

load_data validates against the model's input shape and class count and says what to fix.
"""
from __future__ import annotations

import hashlib
import pathlib

import numpy as np

from fgcompile import npzfile
from fgcompile.errors import DataError

FIX = "Save it with numpy.savez(path, x=..., y=...)."


def load_data(path, input_shape: list | None = None, classes: int | None = None,
              dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """x as the model's input dtype (`dtype`: float32, or an integer type for token ids) and y as int64."""
    path = pathlib.Path(path)
    arrays = npzfile.read_npz(path, ["x", "y"], "data file (.npz with arrays x and y)",
                              "Save inputs as x and integer class labels as y: " + FIX)
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 0:
        raise DataError(f"{path}: x is a single number (0-d); it must hold samples along its first axis. {FIX}")
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        if not np.issubdtype(x.dtype, np.integer):
            raise DataError(f"{path}: x has dtype {x.dtype}; the model takes {dtype.name} inputs (e.g. token ids). "
                            f"Save x as integers.")
        info = np.iinfo(dtype)
        if x.size and (x.min() < info.min or x.max() > info.max):
            raise DataError(f"{path}: x ranges over [{x.min()}, {x.max()}], outside {dtype.name}. Fix x.")
    elif not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: x has dtype {x.dtype}; the model takes float32 inputs. Convert x to float32.")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y has dtype {y.dtype}; labels must be integer class indices (int64).")
    x, y = x.astype(dtype, copy=False), y.astype(np.int64, copy=False)
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{path}: y has shape {list(y.shape)} but x holds {len(x)} samples; y must be [{len(x)}].")
    if len(y) == 0:
        raise DataError(f"{path}: holds no samples.")
    if input_shape is not None:
        fixed = [(i, d) for i, d in enumerate(input_shape[1:], start=1) if isinstance(d, int) and d > 0]
        if x.ndim != len(input_shape) or any(x.shape[i] != d for i, d in fixed):
            raise DataError(f"{path}: x has shape {list(x.shape)} but the model input is {input_shape} "
                            "(first axis: batch). Reshape x to match.")
    if np.issubdtype(dtype, np.floating) and not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise DataError(f"{path}: x holds NaN or Inf in {bad} samples. Clean or drop them.")
    if classes is not None and (y.min() < 0 or y.max() >= classes):
        raise DataError(f"{path}: labels range over [{y.min()}, {y.max()}] but the model has {classes} "
                        f"classes (0..{classes - 1}). Fix y.")
    return x, y


def data_digest(x: np.ndarray, y: np.ndarray) -> str:
    """sha256 of the samples and labels: a resumed run checks it is fed the same data."""
    h = hashlib.sha256()
    for a in (x, y):
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
