"""--config: compile and train options from a TOML file; flags on the command line override it.

    [compile]                 # fgcompile compile / batch
    m = 8
    train = ["fc2"]
    bits = 16
    [train]                   # fgcompile train
    data = "data/train.npz"   # relative paths are relative to the config file
    epochs = 30

Keys are the flags' long names (`lr-shift`, or `lr_shift`; `memory-budget`, `json`). Each value is
checked against the TOML type the flag's value has (an int, a number, true/false, a string, a list of
strings for a repeatable flag) and then converted by the flag's own click type, so the file accepts
what the command line accepts and nothing else: `m = 8.7` and `m = true` are refused as `--m 8.7` is.
The values become the command's defaults (click's default_map), so a flag given on the command line
wins. The file is read like a model or data file (a regular file only, at most MAX_BYTES).
"""
from __future__ import annotations

import difflib
import math
import pathlib

import click

from fgcompile import modelio
from fgcompile.errors import SpecError

import tomllib

MAX_BYTES = 2 ** 20          # a config is a few lines; a larger file is a wrong path (a model, a log)
SECTIONS: list[str] = []     # the tables commands read, filled by option()
NOT_OPTIONS = ("config", "help", "log_level")   # flags about the invocation, not the command's options
INT64 = 2 ** 63              # TOML integers are 64-bit (a longer hex literal may not even print in decimal)


def read(path, section: str, params: list[click.Parameter], ctx: click.Context | None = None) -> dict:
    """The default map for one command: the file's [section], checked against the command's options."""
    path = pathlib.Path(path)
    table = _load(path)
    fail = lambda problem: SpecError(f"--config {path}: {problem}")
    for key, value in table.items():
        if not isinstance(value, dict):
            if key in SECTIONS:
                raise fail(f"[{key}] must be a table of options, e.g. [{key}] on a line of its own, then m = 8.")
            raise fail(f"{key!r} at the top level; options go in a table named for the command: "
                       f"{', '.join(f'[{s}]' for s in SECTIONS)}.")
        if key not in SECTIONS:
            raise fail(f"unknown table [{key}]; the tables are {', '.join(f'[{s}]' for s in SECTIONS)}.")
    options = {long_name(p): p for p in params if isinstance(p, click.Option) and p.name not in NOT_OPTIONS}
    defaults = {}
    for key, value in table.get(section, {}).items():
        name = key.replace("_", "-")
        if name not in options:
            close = difflib.get_close_matches(name, options, 1)
            raise fail(f"[{section}] has no option {key!r}{f' (did you mean {close[0]!r}?)' if close else ''}. "
                       f"Options: {', '.join(sorted(options))}.")
        param = options[name]
        defaults[param.name] = _value(path, section, key, value, param, ctx, fail)
    return defaults


def long_name(param: click.Parameter) -> str:
    """The key of an option in the file: its long flag without the dashes (`--memory-budget` -> memory-budget)."""
    return next((o[2:] for o in param.opts if o.startswith("--")), param.name.replace("_", "-"))


def _load(path: pathlib.Path) -> dict:
    try:
        size = modelio.regular_file(path, "config file", SpecError)
    except SpecError as exc:
        raise SpecError(f"--config {exc}") from None
    if size > MAX_BYTES:
        raise SpecError(f"--config {path}: {size} bytes; a config file holds at most 1 MiB of TOML. Check that "
                        "--config names the .toml file.")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
        return tomllib.loads(raw[:MAX_BYTES].decode("utf-8"))
    except OSError as exc:
        raise SpecError(f"--config {path}: cannot read it ({exc.strerror or exc}).") from None
    except ValueError as exc:   # TOMLDecodeError, UnicodeDecodeError, int's digit limit
        raise SpecError(f"--config {path}: not valid TOML ({exc}). Fix the file.") from None
    except RecursionError:
        raise SpecError(f"--config {path}: not valid TOML (arrays or tables nested too deeply). Fix the "
                        "file.") from None


def _value(path, section, key, value, param: click.Option, ctx, fail):
    """VALUE as the flag would have it, or SpecError naming the key, the type it takes and an example."""
    flag, (one, many) = f"--{long_name(param)}", _kind(param)
    example = f"[{_example(param)}]" if param.multiple else _example(param)
    if param.multiple and not isinstance(value, list):
        raise fail(f"[{section}] {key} = {_show(value)}: {_what(value)}, but {flag} is repeatable and takes a list "
                   f"of {many}. Write e.g. {key} = {example}.")
    items = value if param.multiple else [value]
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and not -INT64 <= item < INT64:
            raise fail(f"[{section}] {key}: an integer beyond TOML's 64-bit range. Pass a value in range.")
        if not _fits(item, param):
            held = f"holds {_what(item)}" if param.multiple else _what(item)
            raise fail(f"[{section}] {key} = {_show(value)}: {held}, but {flag} takes "
                       f"{f'a list of {many}' if param.multiple else one}. Write e.g. {key} = {example}.")
    try:
        items = [param.type.convert(_as_flag(path, param, v), param, ctx) for v in items]
    except click.BadParameter as exc:
        raise fail(f"[{section}] {key} = {_show(value)}: {exc.message.rstrip('.')} (as {flag}). Write e.g. "
                   f"{key} = {example}.") from None
    return tuple(items) if param.multiple else items[0]


def _fits(value, param: click.Option) -> bool:
    """Whether a TOML value has the type the command line would give the flag (a bool is not an int,
    a float is not an int, a number is not a path)."""
    t = param.type
    if isinstance(value, (dict, list)):
        return False
    if param.is_flag or isinstance(t, click.types.BoolParamType):
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if isinstance(t, click.types.IntParamType):
        return isinstance(value, int)
    if isinstance(t, click.types.FloatParamType):
        return isinstance(value, (int, float))
    if isinstance(t, click.Choice):       # bits = 16 reads as naturally as bits = "16"
        return isinstance(value, str) or isinstance(value, int) and all(str(c).isdigit() for c in t.choices)
    return isinstance(value, str)


def _kind(param: click.Option) -> tuple[str, str]:
    """What the flag takes: (one value, several values)."""
    t = param.type
    if param.is_flag or isinstance(t, click.types.BoolParamType):
        return "true or false", "true or false values"
    if isinstance(t, click.Choice):
        choices = ", ".join(map(str, t.choices))
        return f"one of {choices}", f"values, each one of {choices}"
    if isinstance(t, click.types.IntParamType):
        return "an integer", "integers"
    if isinstance(t, click.types.FloatParamType):
        return "a number", "numbers"
    if isinstance(t, click.Path):
        return "a path (a string)", "paths (strings)"
    return "a string", "strings"


def _example(param: click.Option) -> str:
    t, default = param.type, param.default
    if param.is_flag or isinstance(t, click.types.BoolParamType):
        return "true"
    if isinstance(t, click.Choice):
        first = str(t.choices[0])
        return first if first.isdigit() else f'"{first}"'
    if isinstance(t, (click.types.IntParamType, click.types.FloatParamType)):
        return str(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else "1"
    return '"…"'


def _what(value) -> str:
    """What the file holds, in TOML's words."""
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "a table", list: "a list", int: "an integer", float: "a float", str: "a string"}.get(
        type(value), type(value).__name__)


def _show(value) -> str:
    """VALUE as written in TOML, briefly (a table or list may nest 100k deep: never its repr)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{…}"
    if isinstance(value, list):
        return "[…]"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, int) and not -INT64 <= value < INT64:
        return "(an integer beyond 64 bits)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


def _as_flag(path: pathlib.Path, param: click.Option, value):
    """VALUE as the command line would spell it: a relative path is relative to the file, a choice a string."""
    if isinstance(param.type, click.Path):
        return str(path.parent / value)
    return str(value) if isinstance(param.type, click.Choice) else value


def option(section: str):
    """A `--config FILE` option reading [section] into the command's defaults (eager: before the flags)."""
    if section not in SECTIONS:
        SECTIONS.append(section)

    def load(ctx: click.Context, _param, value):
        if value is not None:
            ctx.default_map = {**(ctx.default_map or {}), **read(value, section, ctx.command.params, ctx)}
        return value
    return click.option("--config", type=click.Path(), is_eager=True, expose_value=False,
                        callback=load, help=f"TOML file whose [{section}] table sets this command's options.")
