"""Reading models and writing every output atomically (temp file, fsync, rename).

A reader gets either a whole file or none: no command leaves a half-written output behind.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pathlib
import re
import shutil
import stat
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

from fgcompile.errors import ModelError, OutputError


PROTOBUF_LIMIT = 2 ** 31 - 1   # bytes: protobuf cannot parse a larger message


def regular_file(path, what: str, error=ModelError) -> int:
    """The size of PATH if it is a regular file (after symlinks); else `error` saying what it is. A FIFO
    would block the reader forever and /dev/zero would fill memory, so neither is opened."""
    path = pathlib.Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file. Check the path to the {what}.") from None
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror}). Check the path to the {what}.") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: is a folder, not a {what}. Pass the file itself.")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: is a {_kind(st.st_mode)}, not a regular file; fgcompile reads the {what} only from "
                    "a regular file. Copy the content to a file first.")
    return st.st_size


def _kind(mode: int) -> str:
    return ("FIFO (named pipe)" if stat.S_ISFIFO(mode) else "character device" if stat.S_ISCHR(mode)
            else "block device" if stat.S_ISBLK(mode) else "socket" if stat.S_ISSOCK(mode) else "special file")


def load_model(path) -> onnx.ModelProto:
    """Load an ONNX model with its external data, or raise ModelError saying what is wrong."""
    path = pathlib.Path(path)
    size = regular_file(path, ".onnx model")
    if size > PROTOBUF_LIMIT:
        raise ModelError(f"{path}: {size / 2 ** 30:.1f} GiB, over the 2 GiB limit of an ONNX protobuf file. Save "
                         "the weights as external data: onnx.save(model, path, save_as_external_data=True).")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning subclasses, ...
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc}). "
                         "The file is truncated, corrupt or not ONNX; re-export it.") from None
    if not model.graph.node:
        raise ModelError(f"{path}: not a readable ONNX model (it parses but holds no nodes). The file is "
                         "truncated, corrupt or not ONNX; re-export it.")
    bad = _invalid_string(model)
    if bad is not None:
        raise ModelError(f"{path}: not a readable ONNX model (a name or string is not valid UTF-8: {bad!r}). The "
                         "file is corrupt; re-export it.")
    try:
        for location in _external_files(model):
            if os.path.lexists(path.parent / location):
                regular_file(path.parent / location, "external data file of the model")
        total = model.ByteSize() + _external_bytes(model, path.parent)
        if total > PROTOBUF_LIMIT:   # checked before reading: onnx.checker and onnxruntime fail on it late
            raise ModelError(f"{path}: {total / 2 ** 30:.2f} GiB with its external data, over the 2 GiB limit of an "
                             "ONNX protobuf: fgcompile holds the model, and writes each compiled graph, as one "
                             "protobuf. Compile a smaller model (fewer or narrower layers, or weights quantized to "
                             "fewer bits).")
        onnx.load_external_data_for_model(model, str(path.parent))
    except ModelError:
        raise
    except Exception as exc:  # FileNotFoundError, or onnx's ValidationError for a missing/odd file
        raise ModelError(f"{path}: its weights live in external data that is missing ({exc}). Keep the "
                         "external data file beside the model, or save the model with weights inside.") from None
    for t in model.graph.initializer:
        try:
            numpy_helper.to_array(t)
        except Exception as exc:  # numpy's ValueError for a size mismatch, onnx's for an unknown dtype, ...
            raise ModelError(f"{path}: initializer {t.name!r} is corrupt: its data does not match its dtype and "
                             f"shape {list(t.dims)} ({exc}). Re-export the model.") from None
    return model


def _invalid_string(message):
    """The first string field of a protobuf message tree that did not decode as UTF-8 (protobuf hands those
    back as bytes, and every later use of them raises), or None."""
    from google.protobuf.descriptor import FieldDescriptor as F
    for field, value in message.ListFields():
        many = field.is_repeated if hasattr(field, "is_repeated") else field.label == F.LABEL_REPEATED
        if field.type == F.TYPE_STRING:
            for v in (value if many else [value]):
                if not isinstance(v, str):
                    return v
        elif field.type == F.TYPE_MESSAGE:
            for v in (value if many else [value]):
                bad = _invalid_string(v)
                if bad is not None:
                    return bad
    return None


def _external_files(model: onnx.ModelProto) -> set:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data
    return {next((e.value for e in t.external_data if e.key == "location"), "")
            for t in _get_all_tensors(model) if uses_external_data(t)} - {""}


def _external_bytes(model: onnx.ModelProto, folder: pathlib.Path) -> int:
    """The bytes the model's external data adds once loaded: each tensor's `length`, else the rest of its
    file after `offset` (a missing file counts 0; loading names it)."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data
    total = 0
    for t in _get_all_tensors(model):
        if uses_external_data(t):
            info = ExternalDataInfo(t)
            if info.length:
                total += int(info.length)
            elif os.path.isfile(folder / info.location):
                total += max(os.path.getsize(folder / info.location) - int(info.offset or 0), 0)
    return total


def default_mode(directory: bool = False) -> int:
    """The permissions open()/mkdir() would give under the current umask (mkstemp/mkdtemp give 0600/0700,
    which would leave outputs unreadable to the rest of a team)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


TEMP_TAG = "fgcompile"
_TEMP = re.compile(rf"^\..+\.{TEMP_TAG}-(\d+)-\w+\.tmp$")


def is_temp(name: str) -> bool:
    """Whether NAME is the temp file of one of fgcompile's atomic writes."""
    return _TEMP.match(name) is not None


def real_path(path) -> pathlib.Path:
    """PATH with every symlink resolved; a symlink loop stays as it is (pathlib's resolve() raises
    RuntimeError on one before Python 3.13), so that the command reading it reports ELOOP as one error."""
    return pathlib.Path(os.path.realpath(path))


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class NoSpaceError(OutputError):
    """A write found its disk (or the user's quota) full; the message says how much it needed."""


def no_space(path, needed: int | None) -> NoSpaceError:
    """The error for a write to PATH that found its disk (or the user's quota) full: how much the write
    needed and how much the disk has free."""
    where = pathlib.Path(path).parent
    try:
        free = human_bytes(shutil.disk_usage(where).free)
    except OSError:
        free = "an unknown amount"
    need = human_bytes(needed) if needed is not None else "more space"
    return NoSpaceError(f"{path}: no space left on the device (or quota exceeded): writing it needs {need} and "
                        f"{where} has {free} free; it is left as it was. Free some space there, or write to "
                        "another disk (another -o or folder).")


@contextlib.contextmanager
def space_for(path, size: int):
    """Report a full disk inside the block as one write of `size` bytes to PATH (a folder written file by
    file)."""
    try:
        yield
    except NoSpaceError:
        raise no_space(path, size) from None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temps(folder) -> None:
    """Remove the temp files of atomic writes whose process died before its rename (kill -9)."""
    try:
        entries = list(pathlib.Path(folder).iterdir())
    except OSError:
        return
    for p in entries:
        m = _TEMP.match(p.name)
        if m and not process_alive(int(m.group(1))) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path, size: int | None = None):
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`. A full disk is an
    OutputError that says `size`, the bytes the write needed; `path` and the disk are left as they were."""
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{TEMP_TAG}-{os.getpid()}-", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, default_mode())
        os.close(fd)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise no_space(path, size) from None
        raise OutputError(f"{path}: cannot write here ({exc.strerror}). Choose a writable output "
                          "directory with -o.") from None
    try:
        yield pathlib.Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())   # a delayed-allocation file system may report ENOSPC only here
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise no_space(path, size) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_output_file(path, protected: dict) -> None:
    """Raise OutputError unless PATH may be replaced by a regular file: it must not be a folder or a special
    file (a FIFO, a device such as /dev/null), nor one of the `protected` files {path: what it is}."""
    path = pathlib.Path(path)
    real = real_path(path)
    for other, what in protected.items():
        other = real_path(other)
        if real == other or other in real.parents:
            raise OutputError(f"{path}: is {what}; writing there would destroy it. Choose another output "
                              "file, e.g. -o adapted.onnx.")
    if os.path.lexists(path):
        mode = os.stat(path).st_mode if os.path.exists(path) else os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            raise OutputError(f"{path}: is a folder; -o takes the path of the .onnx file to write, e.g. "
                              f"-o {path}/adapted.onnx.")
        if not stat.S_ISREG(mode) and not stat.S_ISLNK(mode):
            raise OutputError(f"{path}: is a {_kind(mode)}; fgcompile writes only regular files. Choose "
                              "another output file.")


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path, len(data)) as tmp:
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return path


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the named intermediate tensors (types from shape inference)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    known = {o.name for o in out.graph.output}
    inferred = onnx.shape_inference.infer_shapes(out)
    types = {v.name: v.type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for name in names:
        if name not in known and name in types:
            out.graph.output.append(onnx.helper.make_value_info(name, types[name]))
    return out
