"""loop: a training run as a fold of step() over the plan's batches, with an optional sink for its records.

Everything a step uses derives from the step number k, so a run resumed from a state at step k replays
the same steps as one that never stopped:
    (seed, step) = (program.spec.seed, k)     (the graph hashes the pair into the perturbations)
    batch_k = permutation(rng([seed, epoch]))[pos·B : (pos+1)·B],  epoch, pos = divmod(k, steps per epoch)
    lr_k    = peak                                                 constant schedule
            = max(1, round(peak · (1 + cos(π k / total)) / 2))     cosine over the run's total steps
A step whose loss is NaN or Inf keeps the old tensors and is counted (state.bad_steps); more than
max_bad_steps of them end the run. Without a sink nothing is written (an in-memory run); a sink (the
folder's, runtime/sink.py) receives each epoch's record and each state, to checkpoint at its cadence.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time

import numpy as np

from fgcompile.errors import DataError, FgcompileError
from .program import Program
from .state import TrainState
from .step import step

LOGGER = logging.getLogger("fgcompile.train")
NO_SUMS = {"steps": 0, "loss": 0.0, "accuracy": 0.0}   # of an epoch's good steps; the checkpoint carries them


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run's settings: a checkpoint records them (its "run"), since a bit-identical resume needs them unchanged."""
    batch: int
    epochs: int
    schedule: str          # "constant" or "cosine"
    examples: int
    data_sha256: str | None
    lr_numerator: int      # the peak (runtime/rate.py chose it)

    @property
    def per_epoch(self) -> int:
        return self.examples // self.batch

    @property
    def total(self) -> int:
        return self.epochs * self.per_epoch

    def lr_at(self, k: int) -> int:
        return rate_at(self.schedule, self.lr_numerator, k, self.total)


def rate_at(schedule: str, peak: int, k: int, total: int) -> int:
    """The lr numerator of step k of `total` (the module's formula)."""
    if schedule == "cosine":
        return max(1, int(round(peak * 0.5 * (1 + math.cos(math.pi * k / max(total, 1))))))
    return peak


def plan(program: Program, data, examples: int, epochs: int, batch: int, schedule: str, lr_numerator: int,
         data_sha256: str | None = None) -> Plan:
    """The Plan of a run on `examples` loaded examples; DataError when the model's fixed batch forbids it
    (`data` names them in the message)."""
    fixed = program.fixed_batch
    if fixed is not None and examples < fixed:
        raise DataError(f"{data}: holds {examples} examples, fewer than the model's fixed batch of {fixed}. "
                        "Add examples, or re-export the model with a dynamic batch axis.")
    if fixed is not None and batch != fixed:
        raise DataError(f"--batch {batch}: the model's batch dimension is fixed at {fixed}. Pass "
                        f"--batch {fixed}, or re-export the model with a dynamic batch axis.")
    return Plan(min(batch, examples), epochs, schedule, examples, data_sha256, lr_numerator)


def run(program: Program, state: TrainState, data: tuple, plan: Plan, *, val: tuple | None = None, sink=None,
        sums: dict | None = None, max_bad_steps: int | None = None, stop_after: int | None = None,
        progress: bool = False, watch=None) -> tuple[TrainState, dict, list[dict]]:
    """Train from `state` to the plan's end (or for stop_after steps); returns (the last state, the sums of
    its unfinished epoch, the record of each epoch that ended). sums: those of the epoch `state` is in
    (carried() gives them; None: none). watch: called with each new state (the Trainer keeps its own current with it,
    also when the run fails). sink: .epoch(record), .stepped(state, sums) after each step, .save(state,
    sums) before a run ends on bad steps."""
    (x, y), start, history = data, state.step, []
    sums = dict(NO_SUMS) if sums is None else sums
    bar = _progress(plan.total, start, progress)
    t0 = time.perf_counter()
    try:
        for k, epoch, last_of_epoch, idx in batch_order(program.spec.seed, plan, start):
            state, metrics = step(program, state, (x[idx], y[idx]), plan.lr_at(k))
            if watch is not None:
                watch(state)
            if metrics is None:
                _check_bad_steps(state, max_bad_steps, sink, sums)
            else:
                sums = {"steps": sums["steps"] + 1, "loss": sums["loss"] + metrics["loss"],
                        "accuracy": sums["accuracy"] + metrics["accuracy"]}
            if bar is not None:
                bar.update(1)
                if metrics is not None:
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
            if last_of_epoch:   # before its checkpoint: a resume from that checkpoint never replays the epoch
                history.append(_epoch_record(program, state, epoch, sums, time.perf_counter() - t0, val))
                sums = dict(NO_SUMS)
                if sink is not None:
                    sink.epoch(history[-1])
            if sink is not None:
                sink.stepped(state, sums)
            if stop_after is not None and state.step - start >= stop_after:
                break
    finally:
        if bar is not None:
            bar.close()
    return state, sums, history


def carried(sums: dict | None, start: int, per_epoch: int) -> tuple[dict, str | None]:
    """(the sums of the epoch a run starts in, a note): empty at an epoch's first step, else the given ones
    (a checkpoint's: the steps before the resume), so a resumed epoch logs what an uninterrupted one does."""
    if start % per_epoch and sums is not None:
        return sums, None
    note = (f"epoch {start // per_epoch + 1}'s train_loss and train_accuracy cover its steps from {start} on "
            "only: the checkpoint (from an older fgcompile) does not carry the metrics of its earlier steps") \
        if start % per_epoch else None
    return dict(NO_SUMS), note


def batch_order(seed: int, plan: Plan, start: int):
    """(step, epoch, last step of its epoch, example indices) for steps start..total-1: epoch e's
    batches are consecutive slices of permutation(rng([seed, e])), so a resumed run replays them."""
    perm, perm_epoch = None, -1
    for k in range(start, plan.total):
        epoch, pos = divmod(k, plan.per_epoch)
        if epoch != perm_epoch:
            perm, perm_epoch = np.random.default_rng([seed, epoch]).permutation(plan.examples), epoch
        yield k, epoch, pos == plan.per_epoch - 1, perm[pos * plan.batch:(pos + 1) * plan.batch]


def _check_bad_steps(state: TrainState, max_bad_steps: int | None, sink, sums: dict) -> None:
    if max_bad_steps is None or state.bad_steps <= max_bad_steps:
        return
    if sink is not None:
        sink.save(state, sums)
    raise FgcompileError(f"step {state.step - 1}: {state.bad_steps} steps had a NaN/Inf loss "
                         f"(--max-bad-steps {max_bad_steps}). Check the data for extreme values or lower --lr.")


def _epoch_record(program: Program, state: TrainState, epoch: int, sums: dict, seconds: float,
                  val: tuple | None) -> dict:
    """The epoch's record (train metrics: the mean over its good steps; validation when given), logged."""
    n = sums["steps"]
    record = {"epoch": epoch + 1, "step": state.step, "bad_steps": state.bad_steps,
              "train_loss": sums["loss"] / n if n else None,
              "train_accuracy": sums["accuracy"] / n if n else None,
              "seconds": round(seconds, 3)}
    if val is not None:
        v = program.evaluate(state.tensors, *val)
        record.update(val_accuracy=v["accuracy"], val_loss=v["loss"])
        if "auc" in v:   # a Sigmoid head (runtime/metrics.py)
            record.update(val_auc=v["auc"], val_miss_rate=v["miss_rate"])
    LOGGER.info("epoch %s", json.dumps(record))
    return record


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    # disable=None: no bar when stderr is not a terminal, where its carriage-return frames would fill a log
    return tqdm(total=total, initial=start, unit="step", desc="train", dynamic_ncols=True, leave=False, disable=None)
