"""The errors fgcompile raises on bad input. Each message names the problem and the fix.

The CLI prints `str(error)` and exits with status 2; it never shows a traceback for these.
"""


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
