"""Data files: .npz with `x` (shaped like the model input: float32, or integers such as token ids for a
model whose input is integer) and `y` (int64 class labels [n]; for a Sigmoid output (fgcompile/heads.py)
0/1 labels, [n] for a detector's [batch, 1] output, [n, K] for K labels per example). A model with several
data inputs reads one array per input, named as the input (e.g. input_ids, attention_mask), plus `y`
(load_inputs → Inputs).

Compact files may store `x` as integer codes with a float `x_scale` (and optional `x_offset`): the input
is then x_offset + x_scale * x in float32 (the shipped keyword-spotting features are uint8 this way).

load_data validates against the model's input shape, head and class count and says what to fix; `read`
checks (x, y) given in memory (the Python API) the same way.
"""
from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np

from fgcompile import npzfile
from fgcompile.errors import DataError

FIX = "Save it with numpy.savez(path, x=..., y=...)."


def load_data(path, input_shape: list | None = None, classes: int | None = None,
              dtype=np.float32, head: str = "softmax") -> tuple[np.ndarray, np.ndarray]:
    """x as the model's input dtype (`dtype`: float32, or an integer type for token ids) and y as int64.
    classes: the output's last axis; head: softmax (y holds class indices) or sigmoid (0/1 labels)."""
    path = pathlib.Path(path)
    arrays = npzfile.read_npz(path, ["x", "y"], "data file (.npz with arrays x and y)",
                              "Save inputs as x and integer class labels as y: " + FIX, optional=("x_scale", "x_offset"))
    return _checked(path, arrays, input_shape, classes, dtype, "x", head)


def _checked(path, arrays: dict, input_shape, classes, dtype, x_name: str,
             head: str = "softmax") -> tuple[np.ndarray, np.ndarray]:
    x, y = decode_x(path, arrays), arrays["y"]
    if x.ndim == 0:
        raise DataError(f"{path}: {x_name} is a single number (0-d); it must hold samples along its first axis. {FIX}")
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        if not np.issubdtype(x.dtype, np.integer):
            raise DataError(f"{path}: {x_name} has dtype {x.dtype}; the model takes {dtype.name} inputs (e.g. token ids). "
                            f"Save {x_name} as integers.")
        info = np.iinfo(dtype)
        if x.size and (x.min() < info.min or x.max() > info.max):
            raise DataError(f"{path}: {x_name} ranges over [{x.min()}, {x.max()}], outside {dtype.name}. Fix {x_name}.")
    elif not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: {x_name} has dtype {x.dtype}; the model takes float32 inputs. Convert {x_name} to float32, "
                        "or store integer codes with a scalar x_scale (and x_offset) beside them.")
    if not (np.issubdtype(y.dtype, np.integer) or head == "sigmoid" and y.dtype == bool):
        raise DataError(f"{path}: y has dtype {y.dtype}; labels must be integer "
                        f"{'0/1 labels' if head == 'sigmoid' else 'class indices'} (int64).")
    with np.errstate(over="ignore", invalid="ignore"):   # past float32's range: Inf, refused below by name
        x, y = x.astype(dtype, copy=False), y.astype(np.int64, copy=False)
    if head == "sigmoid":
        y = _detection_labels(path, y, len(x), classes)
    elif y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{path}: y has shape {list(y.shape)} but {x_name} holds {len(x)} samples; y must be [{len(x)}].")
    if len(y) == 0:
        raise DataError(f"{path}: holds no samples.")
    check_shape(path, x, input_shape, x_name)
    if np.issubdtype(dtype, np.floating) and not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise DataError(f"{path}: {x_name} holds NaN or Inf in {bad} samples (values past float32's range, "
                        "about ±3.4e38, count as Inf). Clean or drop them.")
    if head != "sigmoid" and classes is not None and (y.min() < 0 or y.max() >= classes):
        raise DataError(f"{path}: labels range over [{y.min()}, {y.max()}] but the model has {classes} "
                        f"classes (0..{classes - 1}). Fix y.")
    return x, y


def _detection_labels(path, y: np.ndarray, n: int, labels: int | None) -> np.ndarray:
    """The 0/1 labels of a Sigmoid output with `labels` per example (fixed: fgcompile/heads.py): [n] for one
    ([n, 1] is taken too), [n, K] for K."""
    one = labels == 1
    if one and y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    want = [n] if one else [n, labels]
    if list(y.shape) != want:
        per = "one label per example" if one else f"{want[1]} labels per example (multi-label)"
        raise DataError(f"{path}: y has shape {list(y.shape)} but the model's Sigmoid output has {per}; y must be "
                        f"{want} of 0/1{'' if one else ', one column per label'}. Fix y.")
    bad = y[(y != 0) & (y != 1)]
    if bad.size:
        raise DataError(f"{path}: y holds {bad.size} labels outside {{0, 1}} (e.g. {bad.flat[0]}); the model's "
                        "Sigmoid output takes 0/1 labels (1: the event, e.g. the keyword; 0: not). Fix y.")
    return y


def check_shape(path, x: np.ndarray, input_shape: list | None, x_name: str = "x") -> None:
    """DataError unless x [N, ...] fits the model input's shape (free axes, e.g. a named batch, match any)."""
    if input_shape is None:
        return
    fixed = [(i, d) for i, d in enumerate(input_shape[1:], start=1) if isinstance(d, int) and d > 0]
    if x.ndim != len(input_shape) or any(x.shape[i] != d for i, d in fixed):
        raise DataError(f"{path}: {x_name} has shape {list(x.shape)} but the model input is {input_shape} "
                        f"(first axis: batch). Reshape {x_name} to match.")


def model_input(model) -> list | None:
    """The shape of an ONNX model's first data input (a graph input that is not an initializer, the one
    analyze feeds): ints, and names or None for free axes; None when the model declares no such shape."""
    inits = {i.name for i in model.graph.initializer}
    t = next((i for i in model.graph.input if i.name not in inits), None)
    if t is None or not t.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.type.tensor_type.shape.dim]


def check_calibration(where, x: np.ndarray, input_shape: list | None) -> None:
    """Calibration inputs x must fit the model input and fill at least one batch where it is fixed."""
    check_shape(where, x, input_shape)
    fixed = input_shape[0] if input_shape and isinstance(input_shape[0], int) and input_shape[0] > 0 else None
    if fixed is not None and len(x) < fixed:
        raise DataError(f"{where}: holds {len(x)} examples, fewer than the model's fixed batch of {fixed}. Add "
                        "examples, or re-export the model with a dynamic batch axis.")


def load_calibration(path, model) -> np.ndarray:
    """x of a --calibration .npz, checked against the model's input like training data."""
    shape = model_input(model)
    x = load_data(path, shape)[0]
    check_calibration(path, x, shape)
    return x


class Inputs:
    """Several named model inputs, sliced together along the batch axis like one array."""

    def __init__(self, arrays: dict):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, idx) -> "Inputs":
        return Inputs({k: v[idx] for k, v in self.arrays.items()})

    def padded(self, pad: int) -> "Inputs":
        return Inputs({k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in self.arrays.items()})


def feeds(name: str, x) -> dict:
    """The data feeds of a batch: {name: x} for one input, the named arrays for several."""
    return dict(x.arrays) if isinstance(x, Inputs) else {name: x}


def load_inputs(path, inputs: dict, classes: int | None = None, head: str = "softmax") -> tuple[Inputs, np.ndarray]:
    """inputs: name -> (shape, dtype) of each data input; the .npz holds one array per name, plus y."""
    path = pathlib.Path(path)
    names = list(inputs)
    arrays = npzfile.read_npz(path, names + ["y"], f"data file (.npz with arrays {', '.join(names)} and y)",
                              f"Save one array per model input, named as the input, and the labels as y: "
                              f"numpy.savez(path, {'=..., '.join(names)}=..., y=...).")
    return _checked_inputs(path, arrays, arrays["y"], inputs, classes, head)


def _checked_inputs(where, xs: dict, y, inputs: dict, classes, head: str = "softmax") -> tuple[Inputs, np.ndarray]:
    checked = {}
    for name, (shape, dtype) in inputs.items():
        checked[name], y = _checked(where, {"x": xs[name], "y": y}, shape, classes, dtype, name, head)
    return Inputs(checked), y


def read(data, inputs: dict, classes: int | None, where: str, head: str = "softmax"):
    """(x, y) of `data`, checked against the model's data inputs (name -> (shape, dtype)) and output (its
    last axis `classes` and its head, fgcompile/heads.py): the path of a .npz, or (x, y) in memory, checked
    as a file's arrays are (x: an array, or a dict of one array per input for a model with several).
    `where` names the argument in messages, e.g. "fit(data)"."""
    if isinstance(data, (str, os.PathLike)):
        if len(inputs) > 1:
            return load_inputs(data, inputs, classes, head)
        (shape, dtype), = inputs.values()
        return load_data(data, shape, classes, dtype, head)
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Inputs):
        return data                   # slices of inputs checked when they were read (tune's folds)
    several = len(inputs) > 1
    if not (isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], dict if several else np.ndarray)
            and isinstance(data[1], np.ndarray)):
        raise _not_arrays(data, inputs, where)
    if not several:
        (shape, dtype), = inputs.values()
        return _checked(where, {"x": data[0], "y": data[1]}, shape, classes, dtype, "x", head)
    missing = [n for n in inputs if not isinstance(data[0].get(n), np.ndarray)]
    if missing:
        raise DataError(f"{where}: x has no array for the model input {missing[0]!r}; pass one array per input "
                        f"({', '.join(inputs)}).")
    return _checked_inputs(where, data[0], data[1], inputs, classes, head)


def _not_arrays(data, inputs: dict, where: str) -> DataError:
    got = (f"({', '.join(type(a).__name__ for a in data)})" if isinstance(data, tuple) and len(data) == 2
           else f"a tuple of {len(data)}" if isinstance(data, tuple) else type(data).__name__)
    if len(inputs) > 1:
        x, fix = (f"a dict of one array per input ({', '.join(inputs)})",
                  "Pass x as {" + ", ".join(f"{n!r}: array" for n in inputs) + "}.")
    else:
        x, fix = "an array", "Convert them with numpy.asarray."
    return DataError(f"{where}: takes the path of a .npz data file, or a tuple (x, y) of numpy arrays (x {x}, y the "
                     f"int64 labels); got {got}. {fix}")


def data_digest(x, y: np.ndarray) -> str:
    """sha256 of the samples and labels: a resumed run checks it is fed the same data."""
    h = hashlib.sha256()
    for a in (list(x.arrays.values()) if isinstance(x, Inputs) else [x]) + [y]:
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def decode_x(path, arrays: dict) -> np.ndarray:
    """x itself, or x_offset + x_scale * x (float32) when the file stores integer codes and their scale."""
    x = arrays["x"]
    if "x_scale" not in arrays and "x_offset" not in arrays:
        return x
    scale, offset = arrays.get("x_scale", np.float32(1)), arrays.get("x_offset", np.float32(0))
    scalars = all(np.ndim(a) == 0 and np.issubdtype(np.asarray(a).dtype, np.floating) for a in (scale, offset))
    if not np.issubdtype(x.dtype, np.integer) or not scalars:
        raise DataError(f"{path}: x_scale/x_offset need integer codes in x (found {x.dtype}) and float scalars "
                        f"(found shapes {np.shape(scale)} and {np.shape(offset)}). Store x as uint8 or int16 codes "
                        "with x_scale and x_offset as float32 scalars, or store x as float32 alone.")
    with np.errstate(over="ignore", invalid="ignore"):   # Inf past float32's range: _checked names it
        return (np.float32(offset) + np.float32(scale) * x.astype(np.float32)).astype(np.float32)


def replayed(data: tuple, replay: tuple) -> tuple:
    """(x, y) of the training data followed by the replayed examples (both read and checked already, e.g. by
    Trainer.load_data): source-domain examples kept in training so the model keeps what it did there."""
    (x, y), (xr, yr) = data, replay
    if isinstance(x, Inputs):
        return Inputs({k: np.concatenate([v, xr.arrays[k]]) for k, v in x.arrays.items()}), np.concatenate([y, yr])
    return np.concatenate([x, xr]), np.concatenate([y, yr])
