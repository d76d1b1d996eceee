"""Trainer: the API's, the CLI's and the demo's handle on training: a Program, the TrainState it stands
at, and fit(), which checks its arguments, chooses the rate and runs the loop.

    Trainer(OUT)        a compiled folder: fit holds its lock, and writes its checkpoints and train_log.jsonl
                        through the folder sink (runtime/sink.py); a resume starts from the checkpoint
    Trainer(compiled)   compile_model's result, in memory: the same loop without a sink; nothing is written
The training itself is runtime/step.py (one step, a pure function) folded by runtime/loop.py; the
Trainer only keeps the state the last run reached, so fit continues from it (at its step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import numbers
import os
import pathlib

from fgcompile import folder
from fgcompile.artifact import Compiled
from fgcompile.errors import SpecError
from fgcompile.session import SessionSettings
from fgcompile.spec import SCHEDULES, RunDefaults
from . import loop, rate, sink
from .data import data_digest
from .program import Program
from .sink import latest_state  # noqa: F401  (re-exported: tests read a folder's state with it)
from .state import TrainState
from .step import step_feeds  # noqa: F401  (re-exported: tests and benchmarks build a step's feeds with it)


class Trainer:
    """Trains a compiled folder (checkpoints and train_log.jsonl in it), or an in-memory result of
    compile_model (nothing written; `state` holds the weights, `export_model` takes the trainer)."""

    def __init__(self, out_dir, threads: int = 0, session: SessionSettings | None = None):
        if not isinstance(out_dir, (str, os.PathLike, Compiled)):
            raise SpecError(f"Trainer({out_dir!r:.60}): takes a compiled folder (a path) or the result of "
                            f"fgcompile.compile_model; got {type(out_dir).__name__}.")
        self.session = session = session or SessionSettings(threads=threads)   # a Ray trial rebuilds the Program with it
        if isinstance(out_dir, Compiled):
            self.compiled, self.out = out_dir, None
            self.program = Program.of_compiled(out_dir, session)
        else:
            self.compiled, self.out = None, pathlib.Path(out_dir)
            self.program = Program.of_folder(self.out, session)
        self.train_state = TrainState(self.program.initial)   # where the last run stopped
        self._sums, self.notes = None, []   # the metric sums of the epoch train_state is in; fit's notes

    @property
    def contract(self):
        return self.program.contract

    @property
    def spec(self):
        return self.program.spec

    @spec.setter
    def spec(self, spec) -> None:      # e.g. another seed: fit then runs as tune's trial of that seed
        self.program = dataclasses.replace(self.program, spec=spec)

    @property
    def train_sha256(self) -> str | None:
        return self.program.train_sha256

    @property
    def data_shape(self) -> list:
        return self.program.data_shape

    @property
    def state(self) -> dict:
        """The state tensors the last run reached (read-only arrays), named as the graph's inputs."""
        return dict(self.train_state.tensors)

    @property
    def initial_state(self) -> dict:
        return dict(self.program.initial)

    @property
    def meta(self) -> dict:
        return {"step": self.train_state.step, "bad_steps": self.train_state.bad_steps}

    def load_data(self, data, where: str = "data"):
        """(x, y) of a .npz path, or of (x, y) given in memory, checked against the model's data inputs."""
        return self.program.load_data(data, where)

    def evaluate(self, x, y, batch: int = 512) -> dict:
        x, y = self.load_data((x, y), "evaluate(x, y)")
        return self.program.evaluate(self.train_state.tensors, x, y, batch)

    def fit(self, data, val=None, epochs: int = RunDefaults.epochs, batch: int = RunDefaults.batch,
            resume: bool = False, checkpoint_every: int = RunDefaults.checkpoint_every,
            schedule: str | None = None, max_bad_steps: int | None = None, progress: bool = True,
            stop_after: int | None = None, restart: bool = False, allow_changed_run: bool = False,
            lr: float | None = None) -> list[dict]:
        """Train; returns the per-epoch history (also appended to OUT/train_log.jsonl as JSON lines).
        A folder that holds a checkpoint trains only with resume (continue it) or restart (discard it).
        stop_after: end after this many steps of the run (tests use it to stop mid-way).
        lr: the rate in LSBs per unit of ĝ (the peak of a cosine schedule); None takes OUT/tune.json's choice,
        else the compiled rate. schedule: None takes OUT/tune.json's choice, else RunDefaults.schedule (cosine)."""
        _check_fit(epochs, batch, checkpoint_every, schedule, lr, resume, restart)
        if self.out is None and (resume or restart):   # in memory: no folder, no checkpoint, nothing to resume
            raise SpecError("resume/restart need a compiled folder; an in-memory Trainer keeps its state.")
        with folder.locked(self.out, "train") if self.out is not None else contextlib.nullcontext():
            return self._fit(data, val, epochs, batch, resume, restart, allow_changed_run, schedule, lr,
                             checkpoint_every, max_bad_steps, stop_after, progress)

    def _fit(self, data, val, epochs, batch, resume, restart, allow_changed_run, schedule, lr, checkpoint_every,
             max_bad_steps, stop_after, progress) -> list[dict]:
        """Choose the rate, read and check the data, start the run (in a folder: continue its checkpoint or
        remove it; nothing is changed before every check passed), then run the loop."""
        peak, schedule, note = rate.choose(self.contract, lr, schedule, epochs, self.out, self.train_sha256)
        if self.out is not None:
            sink.check_files(self.out)
        x, y = self.load_data(data, "fit(data)")
        val = self.load_data(val, "fit(val)") if val is not None else None
        plan = loop.plan(self.program, data, len(y), epochs, batch, schedule, peak, data_digest(x, y))
        state, sums, self.notes, records = self.train_state, self._sums, [note] if note else [], None
        if self.out is not None:
            resumed, resumed_sums, notes = sink.begin(self.out, self.program, plan, resume, restart, allow_changed_run)
            if resumed is not None:
                state, sums = resumed, resumed_sums
            self.notes += notes
            records = sink.FolderSink(self.out, self.program, plan, checkpoint_every)
        sums, note = loop.carried(sums, state.step, plan.per_epoch)
        self.notes += [note] if note else []
        self.train_state = state
        self.train_state, self._sums, history = loop.run(
            self.program, state, (x, y), plan, val=val, sink=records, sums=sums, max_bad_steps=max_bad_steps,
            stop_after=stop_after, progress=progress, watch=self._reached)
        return history

    def _reached(self, state: TrainState) -> None:
        self.train_state = state


def _check_fit(epochs, batch, checkpoint_every, schedule, lr, resume, restart) -> None:
    """SpecError naming the first of fit's arguments that is out of range or of the wrong type."""
    if schedule is not None and schedule not in SCHEDULES:
        raise SpecError(f"--schedule {schedule!r}: choose {' or '.join(SCHEDULES)}.")
    for flag, value in (("--epochs", epochs), ("--batch", batch), ("--checkpoint-every", checkpoint_every)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise SpecError(f"fit({flag[2:].replace('-', '_')}={value!r:.40}): takes a whole number of at least 1.")
        if value < 1:
            raise SpecError(f"{flag} {value}: must be at least 1.")
    if lr is not None and (not isinstance(lr, numbers.Real) or isinstance(lr, bool)):
        raise SpecError(f"fit(lr={lr!r:.40}): takes a rate in LSBs per unit of ĝ (a number), or None.")
    if resume and restart:
        raise SpecError("--resume and --restart contradict each other: pass one.")
