"""Trainer: drives a compiled training graph on onnxruntime.

Everything a step uses derives from the step number k, so a resumed run replays the same steps:
    (seed, step) = (spec.seed, k)           (the graph hashes the pair into the perturbations)
    batch_k = permutation(rng(spec.seed, epoch))[pos·B : (pos+1)·B],  epoch, pos = divmod(k, steps/epoch)
    lr_k    = schedule(k) as the graph's integer lr input
A step whose loss is NaN or Inf keeps the old state and is counted (bad_steps).
"""
from __future__ import annotations

import json
import math
import pathlib
import time

import numpy as np
import onnx

from fgcompile import modelio
from fgcompile.compiler import CHECKPOINT, EVAL, STATE, TRAIN, read_contract
from fgcompile.errors import DataError, FgcompileError, ModelError
from fgcompile.spec import TrainSpec
from . import checkpoint
from .data import load_data
from .metrics import score
from .session import class_count, input_shape, make_session

LOG = "train_log.jsonl"


class Trainer:
    def __init__(self, out_dir, threads: int = 0):
        self.out = pathlib.Path(out_dir)
        if not (self.out / TRAIN).is_file():
            raise ModelError(f"{self.out}: no {TRAIN} here. Run `fgcompile compile MODEL.onnx -o {self.out}` first.")
        train_model = modelio.load_model(self.out / TRAIN)
        self.contract = read_contract(train_model)
        self.spec = TrainSpec(**self.contract["spec"])
        self.sess = make_session(train_model, threads)
        self.eval_sess = make_session(modelio.load_model(self.out / EVAL), threads)
        self.io = self.contract["inputs"]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.classes = class_count(self.eval_sess)
        self.data_shape = input_shape(self.eval_sess, self.io["data"])
        self.state, self.meta = self._initial()

    def _initial(self):
        state, _ = checkpoint.load(self.out / STATE)
        return state, {"step": 0, "bad_steps": 0}

    def load_data(self, path):
        return load_data(path, self.data_shape, self.classes)

    # ------------------------------------------------------------------------------------------ eval
    def evaluate(self, x: np.ndarray, y: np.ndarray, batch: int = 512) -> dict:
        return score(self.eval_sess, self.io["data"], x, y, self.state, batch)

    # ----------------------------------------------------------------------------------------- train
    def lr_at(self, step: int, total: int, schedule: str) -> int:
        lr0 = self.contract["lr"]["default"]
        if schedule == "cosine":
            return max(1, int(round(lr0 * 0.5 * (1 + math.cos(math.pi * step / max(total, 1))))))
        return lr0

    def fit(self, data, val=None, epochs: int = 10, batch: int = 32, resume: bool = False,
            checkpoint_every: int = 50, schedule: str = "constant", max_bad_steps: int | None = None,
            progress: bool = True, stop_after: int | None = None) -> list[dict]:
        """Train; returns the per-epoch history (also appended to OUT/train_log.jsonl as JSON lines).
        stop_after: end after this many steps of the run (tests use it to stop mid-way)."""
        if schedule not in ("constant", "cosine"):
            raise FgcompileError(f"--schedule {schedule!r}: choose constant or cosine.")
        if epochs < 1 or batch < 1:
            raise FgcompileError(f"--epochs {epochs} --batch {batch}: both must be at least 1.")
        x, y = self.load_data(data) if not isinstance(data, tuple) else data
        xv, yv = (self.load_data(val) if not isinstance(val, tuple) else val) if val is not None else (None, None)
        fixed_batch = self.data_shape[0] if isinstance(self.data_shape[0], int) else None
        if fixed_batch is not None and batch != fixed_batch:
            raise DataError(f"--batch {batch}: the model's batch dimension is fixed at {fixed_batch}. Pass "
                            f"--batch {fixed_batch}, or re-export the model with a dynamic batch axis.")
        batch = min(batch, len(y))
        per_epoch = len(y) // batch
        total = epochs * per_epoch
        if resume and (self.out / CHECKPOINT).exists():
            self.state, self.meta = checkpoint.load(self.out / CHECKPOINT)
        elif not resume:
            (self.out / LOG).unlink(missing_ok=True)
        start = self.meta["step"]
        history, perm, perm_epoch = [], None, -1
        bar = _progress(total, start, progress)
        window = []
        t0 = time.perf_counter()
        for step in range(start, total):
            epoch, pos = divmod(step, per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = np.random.default_rng([self.spec.seed, epoch]).permutation(len(y)), epoch
            idx = perm[pos * batch:(pos + 1) * batch]
            feeds = step_feeds(self.contract, x[idx], y[idx], self.spec.seed, step,
                               self.lr_at(step, total, schedule), self.state)
            out = dict(zip(self.outputs, self.sess.run(self.outputs, feeds)))
            if np.isfinite(out["loss"]):
                self.state = {s["name"]: out[s["output"]] for s in self.contract["state"]}
                window.append((float(out["loss"]), float(out["accuracy"])))
            else:
                self.meta["bad_steps"] += 1
                if max_bad_steps is not None and self.meta["bad_steps"] > max_bad_steps:
                    self._save(step + 1)
                    raise FgcompileError(f"step {step}: {self.meta['bad_steps']} steps had a NaN/Inf loss "
                                         f"(--max-bad-steps {max_bad_steps}). Check the data for extreme "
                                         "values or lower --lr.")
            self.meta["step"] = step + 1
            if bar is not None:
                bar.update(1)
                if window:
                    bar.set_postfix(loss=f"{window[-1][0]:.3f}", acc=f"{window[-1][1]:.2f}")
            last_of_epoch = pos == per_epoch - 1
            if (step + 1) % checkpoint_every == 0 or step + 1 == total:
                self._save(step + 1)
            if last_of_epoch:
                record = {"epoch": epoch + 1, "step": step + 1, "bad_steps": self.meta["bad_steps"],
                          "train_loss": float(np.mean([w[0] for w in window])) if window else None,
                          "train_accuracy": float(np.mean([w[1] for w in window])) if window else None,
                          "seconds": round(time.perf_counter() - t0, 3)}
                if xv is not None:
                    v = self.evaluate(xv, yv)
                    record.update(val_accuracy=v["accuracy"], val_loss=v["loss"])
                window = []
                history.append(record)
                with open(self.out / LOG, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if stop_after is not None and step + 1 - start >= stop_after:
                break
        if bar is not None:
            bar.close()
        return history

    def _save(self, step: int) -> None:
        meta = dict(self.meta, step=step, spec=self.contract["spec"])
        checkpoint.save(self.out / CHECKPOINT, self.state, meta)


def step_feeds(contract: dict, x: np.ndarray, y: np.ndarray, seed: int, step: int, lr: int, state: dict) -> dict:
    """The inputs of one training step. seed (< 2^32) and step (< 2^31) are fed as int32, the seed's
    two's-complement bits: the graph's arithmetic is int32 throughout."""
    io = contract["inputs"]
    return {io["data"]: x, io["labels"]: y, io["seed"]: np.array(seed % 2 ** 32, np.uint32).view(np.int32),
            io["step"]: np.array(step, np.int32), io["lr"]: np.array(lr, np.int32), **state}


def latest_state(out_dir) -> dict:
    """The newest state of a compiled folder: its checkpoint if training ran, else the initial state."""
    out = pathlib.Path(out_dir)
    path = out / CHECKPOINT if (out / CHECKPOINT).exists() else out / STATE
    return checkpoint.load(path)[0]


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit="step", desc="train", dynamic_ncols=True, leave=False)
