"""Reading .npz files without trusting them: the declared shape and size of each array is read from its
.npy header (numpy.lib.format) and checked before any data is inflated, and only the arrays asked for
are read. A 1 KB file that declares a 64 GiB array, or a 2 MB zip bomb that inflates to 2 GiB, is
refused with a message instead of exhausting memory.
"""
from __future__ import annotations

import pathlib
import zipfile
import zlib

import numpy as np

from fgcompile import modelio
from fgcompile.bounds import max_bytes
from fgcompile.errors import DataError

MAX_RATIO = 200                # declared / compressed bytes above this, for a large array, is a zip bomb
RATIO_FLOOR = 64 * 2 ** 20     # arrays smaller than this may compress as well as they like


def read_npz(path, keys, what: str, fix: str, error=DataError, optional=()) -> dict:
    """The arrays `keys` (and those of `optional` that exist; optional=None: all) of the .npz at PATH.
    `what` names the file's role ("data file", "checkpoint"); `fix` ends every message."""
    path = pathlib.Path(path)
    modelio.regular_file(path, what, error)
    fail = lambda problem: error(f"{path}: {problem}. {fix}")
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        raise fail("is a .npy file (one array), not an .npz holding several arrays; save them together with "
                   f"numpy.savez(path, {', '.join(f'{k}=...' for k in keys)})")
    try:
        with zipfile.ZipFile(path) as zf:
            members = {n[:-4]: zf.getinfo(n) for n in zf.namelist() if n.endswith(".npy")}
            for key in keys:
                if key not in members:
                    raise fail(f"missing array {key!r} (found {sorted(members) or 'none'})")
            wanted = list(members) if optional is None else [*keys, *optional]
            return {k: _read_array(zf, members[k], k, fail) for k in wanted if k in members}
    except error:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError,
            NotImplementedError, KeyError, RuntimeError) as exc:
        raise fail(f"not a readable .npz ({type(exc).__name__}: {exc})") from None


def _read_array(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, fail) -> np.ndarray:
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise fail(f"array {key!r} has an unknown .npy format version {version}")
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        try:
            shape, fortran, dtype = reader(f, max_header_size=10000)
        except Exception as exc:  # numpy parses the header as a Python literal: SyntaxError, tokenize's
            # TokenError, ValueError, MemoryError, RecursionError, ... all mean a corrupt header
            raise fail(f"not a readable .npz (array {key!r} has a corrupt .npy header: {type(exc).__name__})") from None
        if any(d < 0 for d in shape):
            raise fail(f"not a readable .npz (array {key!r} declares a negative shape {list(shape)})")
        if dtype.hasobject:
            raise fail(f"array {key!r} holds Python objects (dtype {dtype}); store plain numbers")
        declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
        header = f.tell()
        if declared > max_bytes():
            raise fail(f"array {key!r} declares shape {list(shape)} ({declared / 2 ** 30:.1f} GiB), more than this "
                       f"machine can hold ({max_bytes() / 2 ** 30:.1f} GiB allowed)")
        if info.file_size != header + declared:
            raise fail(f"array {key!r} declares {declared} bytes of data but holds {info.file_size - header}; the "
                       "file is truncated or corrupt")
        if declared > RATIO_FLOOR and declared > MAX_RATIO * max(info.compress_size, 1):
            raise fail(f"array {key!r} inflates from {info.compress_size} to {declared} bytes (more than "
                       f"{MAX_RATIO}x); refusing a likely zip bomb")
        data = f.read(declared)
        if len(data) != declared:
            raise fail(f"array {key!r} is truncated")
    array = np.frombuffer(data, dtype=dtype)
    return (array.reshape(shape[::-1]).T if fortran else array.reshape(shape)).copy()
