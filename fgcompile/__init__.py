"""fgcompile: compile quantized ONNX inference graphs into forward-gradient (QZO-FF) training graphs.

The API (fgcompile/api.py) loads on first use, so `import fgcompile` stays light:
compile_model, Trainer, export_model, evaluate, tune, TrainSpec, SessionSettings, write_compiled, run_fleet.
"""
__version__ = "0.1.0"

_API = ("compile_model", "write_compiled", "Trainer", "export_model", "evaluate", "tune", "TrainSpec", "SessionSettings",
        "run_fleet")


def __getattr__(name):
    if name in _API:
        from fgcompile import api
        return getattr(api, name)
    raise AttributeError(f"module 'fgcompile' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
