"""The public API, importable from the top level: fgcompile.compile_model, fgcompile.Trainer,
fgcompile.export_model, fgcompile.evaluate. Each works on a compiled folder or in memory:

    compiled = fgcompile.compile_model(model_proto, fgcompile.TrainSpec(m=8))   # a ModelProto or a path
    trainer = fgcompile.Trainer(compiled)                   # or Trainer("OUT/") for a compiled folder
    trainer.fit((x, y), epochs=5)                           # lr=…: another rate without recompiling
    record = fgcompile.tune("OUT/", "train.npz")            # choose lr on a held-out split (OUT/tune.json);
                                                            # schedule="cosine": its peak, for a cosine run
    adapted, report = fgcompile.export_model(trainer)       # a ModelProto; or export_model("OUT/", "a.onnx")
    report = fgcompile.run_fleet("model.onnx", "fleet.npz", "OUT/")   # simulated devices (fgcompile/fleet.py)
"""
from __future__ import annotations

import os

import onnx

from fgcompile.compiler import compile_model, write_compiled
from fgcompile.artifact import Compiled
from fgcompile.errors import ModelError, SpecError, wrong_type
from fgcompile.fleet import run_fleet
from fgcompile.runtime import export as _export, tune as _tune
from fgcompile.runtime.evaluate import evaluate
from fgcompile.session import SessionSettings
from fgcompile.runtime.trainer import Trainer
from fgcompile.spec import RunDefaults, TrainSpec

__all__ = ["compile_model", "write_compiled", "Trainer", "export_model", "evaluate", "tune", "TrainSpec",
           "SessionSettings", "run_fleet"]


def tune(trained, data, epochs: int = RunDefaults.epochs, batch: int = RunDefaults.batch,
         seeds: int = RunDefaults.seeds, holdout: float | None = None, seed: int | None = None,
         session: SessionSettings | None = None, echo=None, schedule: str = RunDefaults.schedule,
         folds: int | None = None, backend: str = "local", address: str | None = None) -> dict:
    """Choose the learning rate under `schedule` (cosine: the rate is its peak, or constant) by `folds`-fold
    cross-validation on `data` (default 5), or on a held-out `holdout` share of it (runtime/tune.py has the
    protocol), and return the record. `trained`: a compiled folder (the record also goes to OUT/tune.json,
    whose rate and schedule `train`/Trainer.fit then use unless given), compile_model's result, or a
    Trainer of either (its state is left as it is). backend "ray" runs every trial as a Ray task (at
    `address`, else RAY_ADDRESS, else a local instance) with the same scores and choice."""
    trainer = trained if isinstance(trained, Trainer) else Trainer(trained, session=session)
    return _tune.tune(trainer, data, epochs=epochs, batch=batch, seeds=seeds, holdout=holdout, seed=seed, echo=echo,
                      schedule=schedule, folds=folds, backend=backend, address=address)


def export_model(trained, path=None, force: bool = False):
    """A compiled folder (and the .onnx path to write): writes it and returns the rounding report, as
    `fgcompile export`. An in-memory Trainer, or compile_model's result: returns (ModelProto, report),
    and also writes `path` when given."""
    if not isinstance(trained, (str, os.PathLike, Trainer, Compiled)):
        raise wrong_type("export_model(trained=…)", "a compiled folder's path, a Trainer or compile_model's result",
                         trained)
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise wrong_type("export_model(path=…)", "the path of the .onnx file to write", path)
    if isinstance(trained, (str, os.PathLike)) or (isinstance(trained, Trainer) and trained.compiled is None):
        folder = trained if not isinstance(trained, Trainer) else trained.out
        if path is None:
            raise SpecError("export_model(folder, path): pass the .onnx path to write.")
        return _export.export_model(folder, path, force)
    compiled = trained.compiled if isinstance(trained, Trainer) else trained
    model, report = _export.export_state(compiled.source, compiled.contract, trained.state,
                                         _export.matrices(compiled.train, compiled.contract))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the exported model fails onnx.checker ({str(exc).splitlines()[0]}).") from None
    if path is not None:
        _export.check_export_path(path, {}, force)
        _export.save_exported(model, path)
    return model, report
