"""ray_trials: tune's trials as Ray tasks (`tune --backend ray`; fgcompile/cluster.py connects).

Every (rate, fold, seed) trial is one task, all submitted at once; tune reads each rate's scores in order,
so its record and progress lines are the local run's. A task rebuilds the driver's Program from the compiled
folder (or the in-memory Compiled), since sessions do not pickle, and keeps it for the worker's next trial;
the data goes to the object store once. A trial's own error (an FgcompileError) is raised as it is.
"""
from __future__ import annotations

import dataclasses
import pathlib

from fgcompile import cluster
from fgcompile.artifact import LAYOUT, Compiled
from fgcompile.errors import BackendError, DataError, FgcompileError
from . import tune
from .program import Program


def runs_on(ray, trainer, x, y, splits, epochs, batch, schedule):
    """runs_of on Ray: every trial a task, all submitted at once; each rate's scores as they come in. The
    tasks rebuild the Program from the folder (or the in-memory Compiled): sessions do not pickle."""
    program, run_trial = trainer.program, cluster.task(_remote_trial)
    source = trainer.out if trainer.out is not None else ray.put(trainer.compiled)
    data = ray.put((x, y))

    def runs_of(trials):
        refs = [[run_trial(source, trainer.session, program.spec, program.train_sha256, data, splits[k], epochs,
                           batch, n, schedule, s) for n, k, s in rate] for rate in trials]
        try:
            for rate in refs:
                yield _results(ray, rate)
        except BaseException:   # a trial failed, or Ctrl-C: stop the trials still running
            every = [r for rate in refs for r in rate]
            for ref in ray.wait(every, num_returns=len(every), timeout=0)[1]:
                ray.cancel(ref, force=True)
            raise
    return runs_of


def _results(ray, refs) -> list[dict]:
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:   # the trial raised: its own error, as the local run raises it
        if isinstance(exc.cause, FgcompileError):
            raise exc.cause from None
        raise BackendError(f"a tune trial failed on its Ray worker: {_first_line(exc.cause or exc)}") from None
    except ray.exceptions.RayError as exc:
        raise BackendError(f"a tune trial's Ray task failed ({_first_line(exc)}); a lost worker is retried "
                           f"{cluster.RETRIES} times (out of memory? a node lost?). Run tune again.") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


_PROGRAMS: dict = {}   # a worker's Programs by (folder, train.onnx sha256, session): a trial reuses its sessions


def _remote_trial(source, session, spec, train_sha256, data, split, epochs, batch, numerator, schedule, seed) -> dict:
    """scored_trial on a Ray worker, with the driver's Program rebuilt from `source` (a folder or a Compiled)."""
    if isinstance(source, Compiled):
        program = Program.of_compiled(source, session)
    else:
        key = (str(source), train_sha256, session)
        if key not in _PROGRAMS:
            _PROGRAMS.clear()
            program = Program.of_folder(pathlib.Path(source), session, recover=False)
            if program.train_sha256 != train_sha256:
                raise DataError(f"{source}: its {LAYOUT.train} changed while tune ran (another compile?). Run "
                                "tune again.")
            _PROGRAMS[key] = program
        program = _PROGRAMS[key]
    x, y = data
    return tune.scored_trial(dataclasses.replace(program, spec=spec), x, y, split, epochs, batch, numerator,
                             schedule, seed)
