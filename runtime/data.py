"""Data files: .npz with `x` (float32, shaped like the model input) and `y` (int64 class labels).

load_data validates against the model's input shape and class count and says what to fix.
"""
from __future__ import annotations

import pathlib
import zipfile

import numpy as np

from fgcompile.errors import DataError


def load_data(path, input_shape: list | None = None, classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file. Pass an .npz with arrays x and y.")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc}). Save it with numpy.savez(path, x=..., y=...).") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: missing array {key!r} (found {sorted(arrays) or 'none'}). "
                            "Save inputs as x and integer class labels as y.")
    x, y = arrays["x"], arrays["y"]
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: x has dtype {x.dtype}; the model takes float32 inputs. Convert x to float32.")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y has dtype {y.dtype}; labels must be integer class indices (int64).")
    x, y = x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{path}: y has shape {y.shape} but x holds {len(x)} samples; y must be [{len(x)}].")
    if len(y) == 0:
        raise DataError(f"{path}: holds no samples.")
    if input_shape is not None:
        fixed = [(i, d) for i, d in enumerate(input_shape[1:], start=1) if isinstance(d, int) and d > 0]
        if x.ndim != len(input_shape) or any(x.shape[i] != d for i, d in fixed):
            raise DataError(f"{path}: x has shape {list(x.shape)} but the model input is {input_shape} "
                            "(first axis: batch). Reshape x to match.")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise DataError(f"{path}: x holds NaN or Inf in {bad} samples. Clean or drop them.")
    if classes is not None and (y.min() < 0 or y.max() >= classes):
        raise DataError(f"{path}: labels range over [{y.min()}, {y.max()}] but the model has {classes} "
                        f"classes (0..{classes - 1}). Fix y.")
    return x, y
