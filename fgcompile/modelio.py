"""Reading models and writing every output atomically (temp file, fsync, rename).

A reader gets either a whole file or none: no command leaves a half-written output behind.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import tempfile

import numpy as np
import onnx

from fgcompile.errors import ModelError, OutputError


def load_model(path) -> onnx.ModelProto:
    """Load an ONNX model with its external data, or raise ModelError saying what is wrong."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file. Check the path to the .onnx model.")
    if path.is_dir():
        raise ModelError(f"{path}: is a folder, not an .onnx file.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning subclasses, ...
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc}). "
                         "The file is truncated, corrupt or not ONNX; re-export it.") from None
    if not model.graph.node:
        raise ModelError(f"{path}: not a readable ONNX model (it parses but holds no nodes). The file is "
                         "truncated, corrupt or not ONNX; re-export it.")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:  # FileNotFoundError, or onnx's ValidationError for a missing/odd file
        raise ModelError(f"{path}: its weights live in external data that is missing ({exc}). Keep the "
                         "external data file beside the model, or save the model with weights inside.") from None
    return model


def default_mode(directory: bool = False) -> int:
    """The permissions open()/mkdir() would give under the current umask (mkstemp/mkdtemp give 0600/0700,
    which would leave outputs unreadable to the rest of a team)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`."""
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, default_mode())
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write here ({exc.strerror}). Choose a writable output "
                          "directory with -o.") from None
    try:
        yield pathlib.Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_model(model: onnx.ModelProto, path) -> None:
    write_bytes(path, model.SerializeToString())


def save_npz(path, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


def save_json(path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_figure(fig, path, dpi: int = 100) -> pathlib.Path:
    """A matplotlib figure as PNG, atomically; the figure is closed."""
    import matplotlib.pyplot as plt
    path = pathlib.Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path
