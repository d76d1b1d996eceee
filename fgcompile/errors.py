"""The errors fgcompile raises on bad input. Each message names the problem and the fix.

The CLI prints `str(error)` and exits with status 2; it never shows a traceback for these.
"""
from __future__ import annotations


class FgcompileError(Exception):
    """Base class: a user-facing problem with a model, a data file, a flag or an output path."""


class ModelError(FgcompileError):
    """The input model cannot be read, or is not a quantized QDQ inference graph we can train."""


class CompileError(FgcompileError):
    """The model was read but a pass cannot compile it (names the node or tensor and the reason)."""


class SpecError(FgcompileError):
    """A training option is out of range or inconsistent (names the flag)."""


class DataError(FgcompileError):
    """A data .npz file does not match the model (names the array and the expected shape/dtype)."""


class OutputError(FgcompileError):
    """An output path cannot be written."""


class BackendError(FgcompileError):
    """The distributed engine (--backend ray) is not installed or cannot be reached."""


def wrong_type(where: str, takes: str, value, error: type[FgcompileError] | None = None) -> FgcompileError:
    """The error for a Python API argument of the wrong type, e.g. `compile_model(spec=…): takes a TrainSpec
    or a dict of its fields, not int.` (a SpecError unless `error` says otherwise)."""
    return (error or SpecError)(f"{where}: takes {takes}, not {type(value).__name__}.")
