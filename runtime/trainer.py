"""Trainer: drives a compiled training graph on onnxruntime.

Everything a step uses derives from the step number k, so a resumed run replays the same steps:
    (seed, step) = (spec.seed, k)           (the graph hashes the pair into the perturbations)
    batch_k = permutation(rng(spec.seed, epoch))[pos·B : (pos+1)·B],  epoch, pos = divmod(k, steps/epoch)
    lr_k    = schedule(k) as the graph's integer lr input
A step whose loss is NaN or Inf keeps the old state and is counted (bad_steps).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import numbers
import os
import pathlib
import time

import numpy as np
import onnx

from fgcompile import folder, heads, modelio, validate
from fgcompile.artifact import LAYOUT, Compiled, Contract
from fgcompile.errors import DataError, FgcompileError, ModelError, OutputError, SpecError
from . import checkpoint, tune
from .data import data_digest, feeds, read
from .metrics import score
from fgcompile.session import SessionSettings, class_count, input_dtype, input_shape, make_session, running
from fgcompile.spec import SCHEDULES, RunDefaults

LOGGER = logging.getLogger("fgcompile.train")
# run settings a bit-identical resume needs unchanged (epochs only matters to the cosine schedule)
RESUME_KEYS = ("batch", "examples", "data_sha256", "schedule", "epochs", "lr_numerator")
NO_SUMS = {"steps": 0, "loss": 0.0, "accuracy": 0.0}   # of an epoch's good steps; the checkpoint carries them


class Trainer:
    """Trains a compiled folder (checkpoints and train_log.jsonl in it), or an in-memory result of
    compile_model (nothing written; `state` holds the weights, `export_model` takes the trainer)."""

    def __init__(self, out_dir, threads: int = 0, session: SessionSettings | None = None):
        if not isinstance(out_dir, (str, os.PathLike, Compiled)):
            raise SpecError(f"Trainer({out_dir!r:.60}): takes a compiled folder (a path) or the result of "
                            f"fgcompile.compile_model; got {type(out_dir).__name__}.")
        session = session or SessionSettings(threads=threads)
        self.compiled = None if isinstance(out_dir, (str, os.PathLike)) else out_dir
        if self.compiled is not None:
            self._init_in_memory(self.compiled, session)
            return
        self.out = pathlib.Path(out_dir)
        folder.recover(self.out)
        if not (self.out / LAYOUT.train).is_file():
            raise ModelError(f"{self.out}: no {LAYOUT.train} here. Run `fgcompile compile MODEL.onnx -o {self.out}` "
                             "first.")
        train_model, self.contract, self.train_sha256 = open_train_graph(self.out)
        self.spec = self.contract.spec
        self.sess = session_of(train_model, self.out / LAYOUT.train, session=session)
        eval_model = modelio.load_model(self.out / LAYOUT.eval)
        self.eval_sess = session_of(eval_model, self.out / LAYOUT.eval, session=session)
        self._init_io(eval_model)
        self.state, self.meta = self._initial()
        self.initial_state = dict(self.state)

    def _init_in_memory(self, compiled, session: SessionSettings) -> None:
        self.out, self.train_sha256 = None, None
        self.contract = validate.parse_contract(compiled.train, "the in-memory training graph")
        self.spec = self.contract.spec
        self.sess = session_of(compiled.train, "the in-memory training graph", session=session)
        self.eval_sess = session_of(compiled.eval, "the in-memory eval graph", session=session)
        self._init_io(compiled.eval)
        self.state, self.meta = dict(compiled.state), {"step": 0, "bad_steps": 0}
        self.initial_state = dict(self.state)

    def _init_io(self, eval_model) -> None:
        self.io = self.contract.inputs
        self.probabilities = heads.head_of(eval_model).probabilities   # eval's loss of a Softmax output
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.classes = class_count(self.eval_sess)
        self.data_shape = input_shape(self.eval_sess, self.io.data)

    def _path(self, name: str):
        return self.out / name if self.out is not None else f"the in-memory {name}"

    def _initial(self):
        state, _ = checkpoint.load(self.out / LAYOUT.state, self.contract, self.train_sha256)
        return state, {"step": 0, "bad_steps": 0}

    def load_data(self, data, where: str = "data"):
        """(x, y) of a .npz path, or of (x, y) given in memory, checked against the model's data inputs."""
        inputs = {n: (input_shape(self.eval_sess, n), input_dtype(self.eval_sess, n)) for n in self.contract.data_inputs}
        return read(data, inputs, self.classes, where, self.contract.head)

    # ------------------------------------------------------------------------------------------ eval
    def evaluate(self, x: np.ndarray, y: np.ndarray, batch: int = 512) -> dict:
        x, y = self.load_data((x, y), "evaluate(x, y)")
        with running(self._path(LAYOUT.eval)):
            return score(self.eval_sess, self.io.data, x, y, self.state, batch, self.contract.head,
                         probabilities=self.probabilities)

    # ----------------------------------------------------------------------------------------- train
    def lr_numerator_at(self, step: int, total: int, schedule: str) -> int:
        lr0 = self.lr_numerator
        if schedule == "cosine":
            return max(1, int(round(lr0 * 0.5 * (1 + math.cos(math.pi * step / max(total, 1))))))
        return lr0

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
        if self.out is None:                   # in memory: no folder, no checkpoint, nothing to resume
            if resume or restart:
                raise SpecError("resume/restart need a compiled folder; an in-memory Trainer keeps its state.")
            self.lr_numerator, schedule, self.lr_note = self._rate(lr, schedule, epochs)
            return self._fit(data, val, epochs, batch, False, checkpoint_every, schedule, max_bad_steps,
                             progress, stop_after, False, allow_changed_run)
        with folder.locked(self.out, "train"):
            self.lr_numerator, schedule, self.lr_note = self._rate(lr, schedule, epochs)
            return self._fit(data, val, epochs, batch, resume, checkpoint_every, schedule, max_bad_steps,
                             progress, stop_after, restart, allow_changed_run)

    def _fit(self, data, val, epochs, batch, resume, checkpoint_every, schedule, max_bad_steps, progress,
             stop_after, restart, allow_changed_run):
        (x, y), (xv, yv), batch = self._begin(data, val, epochs, batch, schedule, resume, restart, allow_changed_run)
        per_epoch = len(y) // batch
        start, total = self.meta["step"], epochs * per_epoch
        self._carry_epoch(start, per_epoch)
        history = []
        bar = _progress(total, start, progress)
        t0 = time.perf_counter()
        for step, epoch, last_of_epoch, idx in _batch_order(self.spec.seed, len(y), batch, per_epoch, start, total):
            metrics = self._step(x[idx], y[idx], step, self.lr_numerator_at(step, total, schedule), max_bad_steps)
            if metrics is not None:
                sums = self.meta["epoch_sums"]
                sums.update(steps=sums["steps"] + 1, loss=sums["loss"] + metrics[0],
                            accuracy=sums["accuracy"] + metrics[1])
            self.meta["step"] = step + 1
            if bar is not None:
                bar.update(1)
                if metrics is not None:
                    bar.set_postfix(loss=f"{metrics[0]:.3f}", acc=f"{metrics[1]:.2f}")
            if last_of_epoch:   # before its checkpoint: a resume from that checkpoint never replays the epoch
                history.append(self._end_epoch(epoch, step, time.perf_counter() - t0, xv, yv))
            if (step + 1) % checkpoint_every == 0 or step + 1 == total:
                self._save(step + 1)
            if stop_after is not None and step + 1 - start >= stop_after:
                break
        if bar is not None:
            bar.close()
        return history

    def _begin(self, data, val, epochs, batch, schedule, resume, restart, allow_changed_run):
        """((x, y), (x_val, y_val), batch) of a run, after checking the data and the folder (before anything
        is changed); then continues the checkpoint (resume) or discards it and the log (a new run)."""
        for name in (LAYOUT.checkpoint, LAYOUT.log) if self.out is not None else ():
            if os.path.lexists(self.out / name) and not (self.out / name).is_file():
                raise OutputError(f"{self.out / name}: is not a regular file (a folder or special file); "
                                  f"train writes its {name} there. Move it away.")
        x, y = self.load_data(data, "fit(data)")
        xv, yv = self.load_data(val, "fit(val)") if val is not None else (None, None)
        fixed_batch = self.data_shape[0] if isinstance(self.data_shape[0], int) else None
        if fixed_batch is not None and len(y) < fixed_batch:
            raise DataError(f"{data}: holds {len(y)} examples, fewer than the model's fixed batch of {fixed_batch}. "
                            "Add examples, or re-export the model with a dynamic batch axis.")
        if fixed_batch is not None and batch != fixed_batch:
            raise DataError(f"--batch {batch}: the model's batch dimension is fixed at {fixed_batch}. Pass "
                            f"--batch {fixed_batch}, or re-export the model with a dynamic batch axis.")
        batch = min(batch, len(y))
        run = {"batch": batch, "epochs": epochs, "schedule": schedule, "examples": len(y),
               "data_sha256": data_digest(x, y), "lr_numerator": self.lr_numerator}
        has_checkpoint = self.out is not None and (self.out / LAYOUT.checkpoint).exists()
        if has_checkpoint and not (resume or restart):
            _, meta = checkpoint.load(self.out / LAYOUT.checkpoint, self.contract, self.train_sha256)
            raise OutputError(f"{self.out}: already holds a trained checkpoint (step {meta['step']}); training "
                              "from the start would discard it. Pass --resume to continue it, or --restart to "
                              "start over (the checkpoint and train_log.jsonl are replaced).")
        self.notes = [self.lr_note] if self.lr_note else []
        if resume and has_checkpoint:
            self.state, self.meta = checkpoint.load(self.out / LAYOUT.checkpoint, self.contract, self.train_sha256)
            self.meta.setdefault("bad_steps", 0)
            self._check_run(self.meta.get("run"), run, allow_changed_run)
            _truncate_log(self.out / LAYOUT.log, self.meta["step"])
        elif self.out is not None:
            (self.out / LAYOUT.log).unlink(missing_ok=True)
            (self.out / LAYOUT.checkpoint).unlink(missing_ok=True)
        self.run = run
        return (x, y), (xv, yv), batch

    def _step(self, x, y, step: int, lr_numerator: int, max_bad_steps: int | None) -> tuple[float, float] | None:
        """One training step: (loss, accuracy) and the new state, or None and the old state kept when
        the loss is NaN/Inf (counted; more than max_bad_steps of them end the run)."""
        feeds = step_feeds(self.contract, x, y, self.spec.seed, step, lr_numerator, self.state)
        with running(self._path(LAYOUT.train)):
            out = dict(zip(self.outputs, self.sess.run(self.outputs, feeds)))
        if np.isfinite(out["loss"]):
            self.state = {s.name: out[s.output] for s in self.contract.state}
            return float(out["loss"]), float(out["accuracy"])
        self.meta["bad_steps"] += 1
        if max_bad_steps is not None and self.meta["bad_steps"] > max_bad_steps:
            self._save(step + 1)
            raise FgcompileError(f"step {step}: {self.meta['bad_steps']} steps had a NaN/Inf loss "
                                 f"(--max-bad-steps {max_bad_steps}). Check the data for extreme "
                                 "values or lower --lr.")
        return None

    def _carry_epoch(self, start: int, per_epoch: int) -> None:
        """Start the sums of the epoch's metrics: empty at an epoch's first step, else the checkpoint's (the
        steps before the resume), so a resumed epoch logs what an uninterrupted one does."""
        if start % per_epoch == 0 or "epoch_sums" not in self.meta:
            if start % per_epoch:
                self.notes.append(f"epoch {start // per_epoch + 1}'s train_loss and train_accuracy cover its steps "
                                  f"from {start} on only: the checkpoint (from an older fgcompile) does not carry "
                                  "the metrics of its earlier steps")
            self.meta["epoch_sums"] = dict(NO_SUMS)

    def _end_epoch(self, epoch: int, step: int, seconds: float, xv, yv) -> dict:
        """The epoch's record (train metrics: the mean over its good steps, validation when given), logged
        and appended to OUT/train_log.jsonl; the epoch's sums start again."""
        sums, self.meta["epoch_sums"] = self.meta["epoch_sums"], dict(NO_SUMS)
        n = sums["steps"]
        record = {"epoch": epoch + 1, "step": step + 1, "bad_steps": self.meta["bad_steps"],
                  "train_loss": sums["loss"] / n if n else None,
                  "train_accuracy": sums["accuracy"] / n if n else None,
                  "seconds": round(seconds, 3)}
        if xv is not None:
            v = self.evaluate(xv, yv)
            record.update(val_accuracy=v["accuracy"], val_loss=v["loss"])
            if "auc" in v:   # a Sigmoid head (runtime/metrics.py)
                record.update(val_auc=v["auc"], val_miss_rate=v["miss_rate"])
        LOGGER.info("epoch %s", json.dumps(record))
        if self.out is not None:
            _append_line(self.out / LAYOUT.log, json.dumps(record))
        return record

    def _check_run(self, before: dict | None, now: dict, allow: bool) -> None:
        """A resume replays steps bit for bit only with the same batch, data and schedule (and, for the
        cosine schedule, epochs). Say what changed; refuse unless allowed."""
        if not before:
            return
        changed = {k: (before.get(k), now[k]) for k in RESUME_KEYS if k in before and before[k] != now[k]}
        shown = ", ".join(f"{k} {'changed' if k == 'data_sha256' else f'{a} -> {b}'}" for k, (a, b) in changed.items())
        breaking = [k for k in changed if k != "epochs" or now["schedule"] == "cosine"]
        if breaking and not allow:
            raise SpecError(f"--resume: the run differs from the checkpoint's ({shown}), so the resumed steps "
                            "would not match an uninterrupted run. Pass the original --data/--batch/--epochs/"
                            "--schedule/--lr, --restart to start over, or --allow-changed-run to continue anyway.")
        if changed:
            self.notes.append(f"resuming with a changed run: {shown}")

    def _rate(self, lr: float | None, schedule: str | None, epochs: int) -> tuple[int, str, str | None]:
        """(lr numerator, schedule, a note) of a run: each as given, else OUT/tune.json's choice (the note
        says which, and warns when the run's epochs or schedule are not the ones it was tuned for: the best
        rate moves with the budget), else the compiled rate and RunDefaults.schedule."""
        c = self.contract.lr_numerator
        if lr is not None:
            numerator = c.of(lr)
            if not 1 <= numerator <= c.max:
                raise SpecError(f"--lr {lr}: the graph takes rates from 2**-{c.shift} to {c.max / (1 << c.shift):g} "
                                "LSBs per unit of ĝ (its int32 lr input over 2**shift). Pass a rate in that range.")
        choice = tune.read_choice(self.out, self.train_sha256) \
            if self.out is not None and (lr is None or schedule is None) else None
        if choice is None:
            return (c.default if lr is None else numerator), schedule or RunDefaults.schedule, None
        taken = []
        if lr is None:
            if not 1 <= choice["lr_numerator"] <= c.max:
                raise DataError(f"{self.out / LAYOUT.tune}: its rate {choice['lr_numerator']} is outside the graph's "
                                f"[1, {c.max}]. Run `fgcompile tune` again, or delete the file.")
            numerator = choice["lr_numerator"]
            taken.append(f"lr {choice['lr']:g}")
        if schedule is None:
            schedule = choice["schedule"]
            taken.append(f"the {schedule} schedule")
        other = f"; tuned under the {choice['schedule']} schedule, not {schedule}" \
            if lr is None and schedule != choice["schedule"] else ""
        note = (f"{' and '.join(taken)} from {self.out / LAYOUT.tune} (chosen by fgcompile tune{other}; compiled lr: "
                f"{c.default / (1 << c.shift):g}; --lr/--schedule override)")
        if lr is None and choice["epochs"] not in (None, epochs):
            note += (f". Warning: that rate was tuned for {choice['epochs']} epochs and this run trains {epochs}; the "
                     f"best rate moves with the budget: run `fgcompile tune {self.out} --data TRAIN.npz --epochs "
                     f"{epochs}` first")
        return numerator, schedule, note

    def _save(self, step: int) -> None:
        if self.out is None:
            return
        meta = dict(self.meta, step=step, spec=dataclasses.asdict(self.spec), run=self.run,
                    train_sha256=self.train_sha256)
        checkpoint.save(self.out / LAYOUT.checkpoint, self.state, meta)


def step_feeds(contract: Contract, x: np.ndarray, y: np.ndarray, seed: int, step: int, lr_numerator: int,
               state: dict) -> dict:
    """The inputs of one training step. seed (< 2^32) and step (< 2^31) are fed as int32, the seed's
    two's-complement bits: the graph's arithmetic is int32 throughout."""
    io = contract.inputs
    return {**feeds(io.data, x), io.labels: y, **scalar_feeds(contract, seed, step, lr_numerator), **state}


def scalar_feeds(contract: Contract, seed: int, step: int, lr_numerator: int) -> dict:
    io = contract.inputs
    return {io.seed: np.array(seed % 2 ** 32, np.uint32).view(np.int32), io.step: np.array(step, np.int32),
            io.lr: np.array(lr_numerator, np.int32)}


def open_train_graph(out: pathlib.Path):
    """(model, validated contract, sha256 of the file) of OUT/train.onnx."""
    model = modelio.load_model(out / LAYOUT.train)
    return model, validate.parse_contract(model, out / LAYOUT.train), validate.file_sha256(out / LAYOUT.train)


def session_of(model: onnx.ModelProto, path, threads: int = 0, session: SessionSettings | None = None):
    try:
        return make_session(model, threads, session)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:300]}). The file "
                         "was edited or damaged; recompile the model.") from None


def latest_state(out_dir, contract: Contract | None = None) -> dict:
    """The newest state of a compiled folder, checked against its contract: its checkpoint if training
    ran, else the initial state."""
    out = pathlib.Path(out_dir)
    folder.recover(out)
    sha = None
    if contract is None:
        _, contract, sha = open_train_graph(out)
    elif (out / LAYOUT.train).is_file():
        sha = validate.file_sha256(out / LAYOUT.train)
    path = out / LAYOUT.checkpoint if (out / LAYOUT.checkpoint).exists() else out / LAYOUT.state
    return checkpoint.load(path, contract, sha)[0]


def _batch_order(seed: int, n: int, batch: int, per_epoch: int, start: int, total: int):
    """(step, epoch, last step of its epoch, example indices) for steps start..total-1: epoch e's
    batches are consecutive slices of permutation(rng([seed, e])), so a resumed run replays them."""
    perm, perm_epoch = None, -1
    for step in range(start, total):
        epoch, pos = divmod(step, per_epoch)
        if epoch != perm_epoch:
            perm, perm_epoch = np.random.default_rng([seed, epoch]).permutation(n), epoch
        yield step, epoch, pos == per_epoch - 1, perm[pos * batch:(pos + 1) * batch]


def _append_line(path: pathlib.Path, line: str) -> None:
    """Append one line whole or not at all: a write the disk cut short is cut back off."""
    data = f"{line}\n".encode()
    with open(path, "ab", buffering=0) as f:
        start = f.tell()
        try:
            if f.write(data) != len(data):   # a short write: the disk filled mid-line
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        except OSError as exc:
            f.truncate(start)
            if exc.errno in modelio.NO_SPACE:
                raise modelio.no_space(path, len(data)) from None
            raise


def _truncate_log(path: pathlib.Path, step: int) -> None:
    """Keep the log records up to `step` (those after it will be replayed), and drop a torn last line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    modelio.write_bytes(path, "".join(f"{line}\n" for line in kept).encode())


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    # disable=None: no bar when stderr is not a terminal, where its carriage-return frames would fill a log
    return tqdm(total=total, initial=start, unit="step", desc="train", dynamic_ncols=True, leave=False, disable=None)
