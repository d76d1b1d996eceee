"""--config: compile and train options from a TOML file; flags on the command line override it.

    [compile]                 # fgcompile compile / batch
    m = 8
    train = ["fc2"]
    bits = 16
    [train]                   # fgcompile train
    data = "data/train.npz"   # relative paths are relative to the config file
    epochs = 30

Keys are the long flag names (`lr-shift` or `lr_shift`). The file's values become the command's
defaults (click's default_map), so a flag given on the command line wins.
"""
from __future__ import annotations

import pathlib
import sys

import click

from fgcompile.errors import SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:                                       # Python 3.10
    import tomli as tomllib


def read(path, section: str, params: list[click.Parameter]) -> dict:
    """The default map for one command: the file's [section], checked against the command's options."""
    path = pathlib.Path(path)
    try:
        table = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SpecError(f"--config {path}: cannot read it ({exc.strerror or exc}).") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"--config {path}: not valid TOML ({exc}). Fix the file.") from None
    values = table.get(section, {})
    if not isinstance(values, dict):
        raise SpecError(f"--config {path}: [{section}] must be a table of options.")
    options = {p.name: p for p in params if isinstance(p, click.Option) and p.name not in ("config", "help")}
    defaults = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in options:
            raise SpecError(f"--config {path}: [{section}] has no option {key!r}. Options: "
                            f"{', '.join(sorted(n.replace('_', '-') for n in options))}.")
        param = options[name]
        if isinstance(param.type, click.Choice):
            value = str(value)
        elif isinstance(param.type, click.Path) and isinstance(value, str):
            value = str(path.parent / value)
        defaults[name] = value
    return defaults


def option(section: str):
    """A `--config FILE` option reading [section] into the command's defaults (eager: before the flags)."""
    def load(ctx: click.Context, _param, value):
        if value is not None:
            ctx.default_map = {**(ctx.default_map or {}), **read(value, section, ctx.command.params)}
        return value
    return click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
                        callback=load, help=f"TOML file whose [{section}] table sets this command's options.")
