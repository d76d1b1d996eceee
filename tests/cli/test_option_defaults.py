"""The compile options' defaults are TrainSpec's (one place), and `batch` shares them."""
import dataclasses

from fgcompile.cli import main
from fgcompile.spec import DEFAULT_M, TrainSpec


def test_every_spec_option_defaults_to_trainspec():
    fields = {f.name: f.default for f in dataclasses.fields(TrainSpec)}
    for command in ("compile", "batch"):
        options = {p.name: p for p in main.commands[command].params if p.name in fields and not p.multiple}
        assert len(options) >= 20, sorted(options)
        for name, option in options.items():
            want = fields[name]   # a Choice of numbers (--bits, --headroom) holds them as strings, None as auto
            shown = "auto" if want is None else str(want)
            assert option.default == (shown if isinstance(option.default, str) else want), name
    inspect_m = next(p for p in main.commands["inspect"].params if p.name == "m")
    assert TrainSpec.m is None and inspect_m.default == DEFAULT_M["sign"]   # inspect estimates weight perturbation

