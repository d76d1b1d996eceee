"""tune: choose the learning rate of a compiled folder, under a schedule, on a held-out split of its
training data, or by K-fold cross-validation.

The rate is the training graph's int32 `lr` input, so trials need no recompile (ε is compiled into the
graph and is not tuned). The protocol, recorded in OUT/tune.json:

    split    perm = numpy.random.default_rng(seed).permutation(n); the first round(holdout·n) examples of
             perm validate, the others fit (seed: the compiled spec's seed unless given). With K folds:
             fold i validates perm[round(i·n/K):round((i+1)·n/K)] and fits the rest, so every example
             validates once
    grid     spec.lr_grid(resolution of the training grid), and under the cosine schedule twice its largest
             rate too (cosine's mean rate is half its peak); kept where 1 <= round(lr·2^shift) <= lr_max
    trial    per rate, per fold and per seed s in seed, seed+1, …: train from the initial state on the
             fold's fit split for `epochs` epochs under the schedule (constant, or cosine from that peak
             rate; the Trainer's batch order and perturbations for s), score its validation split
    choice   the highest validation accuracy, the mean over trials; ties go to the lower mean validation
             loss, then the lower rate. A Sigmoid head (a detector, fgcompile/heads.py) is judged by its
             ROC AUC instead of accuracy (the mean over the trials that have one), then the same ties
Only the file given as data is read: never test data. `train` without --lr/--schedule uses the chosen
rate/schedule (runtime/rate.py); tune.json names the train.onnx it belongs to, so a record of another compile
is refused. Records from before the schedule was recorded were tuned under the constant schedule.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pathlib
import statistics
import time

import numpy as np

from fgcompile import __version__, cluster, folder, grid, modelio
from fgcompile.artifact import LAYOUT, Contract
from fgcompile.errors import DataError, OutputError, SpecError
from fgcompile.spec import SCHEDULES, RunDefaults, lr_grid
from . import loop
from .data import data_digest
from .state import TrainState

FORMAT = "fgcompile-tune/1"
MAX_RECORD_BYTES = 1 << 20
MIN_VALIDATION = 10   # examples: below this one example moves the score by more than 10 points
SPLIT = "numpy.random.default_rng(seed).permutation(n); the first round(holdout*n) validate, the rest fit"
FOLDS = ("numpy.random.default_rng(seed).permutation(n); fold i validates perm[round(i*n/K):round((i+1)*n/K)], "
         "the rest fit")


def split(n: int, seed: int, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) indices of n examples: the documented seeded split."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(holdout * n))
    return perm[k:], perm[:k]


def fold_splits(n: int, seed: int, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, validation) indices of each of k folds of n examples, from the same seeded permutation."""
    perm = np.random.default_rng(seed).permutation(n)
    cuts = [int(round(i * n / k)) for i in range(k + 1)]
    return [(np.concatenate([perm[:a], perm[b:]]), perm[a:b]) for a, b in zip(cuts, cuts[1:])]


def rates(contract: Contract, schedule: str = RunDefaults.schedule) -> list[tuple[float, int]]:
    """(lr, numerator) of the grid for this graph's training grid and schedule, within the graph's fixed
    point range."""
    c = contract.lr_numerator
    lrs = list(lr_grid(grid.resolution_bits(contract.state), contract.spec.estimator))
    lrs += [2 * lrs[-1]] if schedule == "cosine" else []     # its mean rate is half the peak
    grid_rates = [(lr, c.of(lr)) for lr in lrs]
    return [(lr, n) for lr, n in grid_rates if 1 <= n <= c.max]


def tune(trainer, data, epochs: int = RunDefaults.epochs, batch: int = RunDefaults.batch,
         seeds: int = RunDefaults.seeds, holdout: float | None = None, seed: int | None = None,
         echo=None, schedule: str = RunDefaults.schedule, folds: int | None = None, backend: str = "local",
         address: str | None = None) -> dict:
    """Try every rate of the grid under `schedule` (each rate the peak of a cosine one) on held-out parts
    of `data` (a path, or (x, y)): each of `folds` >= 2 folds in turn (default RunDefaults.folds), or a
    `holdout` share of it. Data whose labels are all one class is refused. Return the record; a Trainer of a compiled folder also
    writes it to OUT/tune.json (under the folder's lock). The trainer's own state is not changed. echo:
    called with one progress line per rate. backend "ray": every trial a Ray task (fgcompile/cluster.py, at
    `address`), with the same scores and choice as "local", bit for bit."""
    cluster.check_backend(backend, address)
    if backend == "ray":
        cluster.import_ray()   # a missing extra is said before any data is read
    if folds is not None and folds < 2:   # one "fold" validates nothing it did not fit: it would be a holdout
        raise SpecError(f"--folds {folds}: must be at least 2 (or use --holdout F for one split, e.g. --holdout "
                        f"{RunDefaults.holdout}).")
    folds = (1 if holdout is not None else RunDefaults.folds) if folds is None else folds
    if folds > 1 and holdout is not None:
        raise SpecError(f"--holdout {holdout:g} with --folds {folds}: K folds each hold out 1/K of the data; "
                        "pass one of the two.")
    holdout = RunDefaults.holdout if holdout is None else holdout
    _check_budget(epochs, batch, seeds, holdout, folds)
    if schedule not in SCHEDULES:
        raise SpecError(f"--schedule {schedule!r}: choose {' or '.join(SCHEDULES)}.")
    program = trainer.program
    seed = program.spec.seed if seed is None else seed
    if not 0 <= seed < 2 ** 32 - seeds:
        raise SpecError(f"--seed {seed}: must be in [0, 2**32 - {seeds}) (one seed per trial).")
    x, y = program.load_data(data, "tune(data)")
    if len(y) and (y == y[0]).all():
        raise DataError(f"{data if not isinstance(data, tuple) else 'the data'}: all {len(y)} labels are class "
                        f"{y[0]}; a rate chosen on one class is meaningless (every rate that keeps predicting it "
                        "scores the same). Tune on training data with at least two classes, or pass --lr to train.")
    splits = [split(len(y), seed, holdout)] if folds == 1 else fold_splits(len(y), seed, folds)
    fixed = program.fixed_batch
    fit, val = min(len(f) for f, _ in splits), min(len(v) for _, v in splits)
    if val < MIN_VALIDATION or fit < max(1, fixed or 1):
        how = f"--holdout {holdout:g}" if folds == 1 else f"--folds {folds}"
        raise DataError(f"{data if not isinstance(data, tuple) else 'the data'}: holds {len(y)} examples; "
                        f"{how} leaves {fit} to fit and {val} to validate, and tune "
                        f"needs at least {MIN_VALIDATION} to validate and {max(1, fixed or 1)} to fit. Pass "
                        f"more training examples, or another {how.split()[0]}.")
    grid_rates = rates(program.contract, schedule)
    if not grid_rates:
        raise SpecError(f"no learning rate of the grid fits this graph's fixed point (lr_max "
                        f"{program.contract.lr_numerator.max}, shift {program.contract.lr_numerator.shift}); pass --lr to "
                        "train instead.")
    protocol = {"method": SPLIT, "seed": seed, "holdout": holdout, "fit": len(splits[0][0]),
                "validation": len(splits[0][1])} if folds == 1 else \
        {"method": FOLDS, "seed": seed, "folds": folds, "fit": [len(f) for f, _ in splits],
         "validation": [len(v) for _, v in splits]}
    with contextlib.ExitStack() as stack:
        runs_of = functools.partial(_local_trials, program, x, y, splits, epochs, batch, schedule)
        if backend == "ray":
            from .ray_trials import runs_on
            runs_of = runs_on(stack.enter_context(cluster.connected(address)), trainer, x, y, splits, epochs, batch,
                              schedule)
        path = None if trainer.out is None else _record_path(trainer.out, stack)
        record = _sweep(program, x, y, protocol, grid_rates, epochs, batch, seed, seeds, len(splits), schedule, echo,
                        runs_of)
        if path is None:
            return record
        record["train_sha256"] = program.train_sha256
        if not isinstance(data, tuple):
            record["data"]["file"] = str(pathlib.Path(data).resolve())
        modelio.save_json(path, record)
    return record


def _record_path(out: pathlib.Path, stack: contextlib.ExitStack) -> pathlib.Path:
    """OUT/tune.json, checked writable, with OUT's lock held for the rest of the stack."""
    path = out / LAYOUT.tune
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputError(f"{path}: is not a regular file; tune writes its record there. Move it away.")
    stack.enter_context(folder.locked(out, "tune"))
    return path


def _check_budget(epochs: int, batch: int, seeds: int, holdout: float, folds: int) -> None:
    for flag, value in (("--epochs", epochs), ("--batch", batch), ("--seeds", seeds)):
        if value < 1:
            raise SpecError(f"{flag} {value}: must be at least 1.")
    if seeds > 16:
        raise SpecError(f"--seeds {seeds}: at most 16 seeds per rate (each one is a training run).")
    if folds > 20:
        raise SpecError(f"--folds {folds}: at most 20 folds (each one is a training run per seed and rate).")
    if not (math.isfinite(holdout) and 0 < holdout < 1):
        raise SpecError(f"--holdout {holdout}: the share of the data held out must be in (0, 1), e.g. 0.2.")


def _sweep(program, x, y, protocol, grid_rates, epochs, batch, seed, seeds, folds, schedule, echo, runs_of) -> dict:
    """The record of the sweep; runs_of(trials) yields, per rate, the scores of its trials (a list of
    (lr_numerator, fold, seed)), in order."""
    t0 = time.perf_counter()
    trials = [[(numerator, k, s) for k in range(folds) for s in range(seed, seed + seeds)]
              for _, numerator in grid_rates]
    scores = []
    for i, ((lr, numerator), results) in enumerate(zip(grid_rates, runs_of(trials))):
        runs = [{"seed": s, "val_accuracy": v["accuracy"], "val_loss": v["loss"]}
                | ({"val_auc": v["auc"], "val_miss_rate": v["miss_rate"]} if "auc" in v else {})
                | ({"fold": k} if folds > 1 else {}) for (_, k, s), v in zip(trials[i], results)]
        score = {"lr": lr, "lr_numerator": numerator,
                 "val_accuracy": statistics.mean(r["val_accuracy"] for r in runs),
                 "val_loss": statistics.mean(r["val_loss"] for r in runs), "runs": runs}
        if program.contract.head == "sigmoid":   # a fold without both classes has no AUC nor miss rate
            for key in ("val_auc", "val_miss_rate"):
                known = [r[key] for r in runs if r[key] is not None]
                score[key] = statistics.mean(known) if known else None
        scores.append(score)
        if echo is not None:
            judged = (f"AUC {_shown(score['val_auc'])}, miss rate {_shown(score['val_miss_rate'])}"
                      if "val_auc" in score else f"accuracy {score['val_accuracy']:.2%}")
            echo(f"tune {i + 1}/{len(grid_rates)}: lr {lr:g}: validation {judged}, "
                 f"loss {score['val_loss']:.4f} ({time.perf_counter() - t0:.1f} s)")
    best = max(scores, key=lambda r: (_judged(r), -r["val_loss"], -r["lr"]))
    return {"format": FORMAT, "fgcompile": __version__,
            "data": {"sha256": data_digest(x, y), "examples": len(y)},
            "split": protocol,
            "budget": {"epochs": epochs, "batch": batch, "seeds": list(range(seed, seed + seeds))},
            "schedule": schedule, "grid": [lr for lr, _ in grid_rates], "scores": scores,
            "choice": {"lr": best["lr"], "lr_numerator": best["lr_numerator"], "schedule": schedule},
            "seconds": round(time.perf_counter() - t0, 3)}


def _local_trials(program, x, y, splits, epochs, batch, schedule, trials):
    """runs_of in this process: one trial after another, each rate's scores as soon as they are known."""
    for rate in trials:
        yield [scored_trial(program, x, y, splits[k], epochs, batch, n, schedule, s) for n, k, s in rate]


def scored_trial(program, x, y, split, epochs: int, batch: int, numerator: int, schedule: str, seed: int) -> dict:
    """The validation scores of one trial: trial() on the split's fit part, evaluated on its validation part."""
    fit, val = split
    state = trial(program, x[fit], y[fit], epochs, batch, numerator, schedule, seed)
    return program.evaluate(state.tensors, x[val], y[val])


def _judged(score: dict) -> float:
    """What a rate is chosen by: validation AUC for a Sigmoid head (none: lowest), else accuracy."""
    if "val_auc" in score:
        return -math.inf if score["val_auc"] is None else score["val_auc"]
    return score["val_accuracy"]


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def trial(program, x, y, epochs: int, batch: int, numerator: int, schedule: str, seed: int):
    """The state of one trial: a run from the initial state with `seed` (its perturbations and batch
    order), as `train` would run it, writing nothing."""
    program = program.with_seed(seed)
    plan = loop.plan(program, "the data", len(y), epochs, batch, schedule, numerator)
    return loop.run(program, TrainState(program.initial), (x, y), plan)[0]


def read_choice(out: pathlib.Path, train_sha256: str | None) -> dict | None:
    """OUT/tune.json's choice {lr, lr_numerator, schedule} and the epochs it was tuned for (None if the
    record does not say), or None when there is none; a damaged record,
    or one of another compile, is refused (the run would otherwise train at a rate nobody chose)."""
    path = pathlib.Path(out) / LAYOUT.tune
    if not os.path.lexists(path):
        return None
    fix = f"Run `fgcompile tune {out} --data TRAIN.npz` again, or delete {path}."
    if modelio.regular_file(path, "tune record", DataError) > MAX_RECORD_BYTES:
        raise DataError(f"{path}: larger than a tune record can be ({MAX_RECORD_BYTES} bytes). {fix}")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a record fgcompile tune wrote ({exc}). {fix}") from None
    choice = record.get("choice") if isinstance(record, dict) else None
    if not isinstance(choice, dict) or record.get("format") != FORMAT \
            or not isinstance(choice.get("lr_numerator"), int) or not isinstance(choice.get("lr"), (int, float)):
        raise DataError(f"{path}: not a record fgcompile tune wrote (format {FORMAT} with a choice). {fix}")
    if choice.get("schedule", "constant") not in SCHEDULES:
        raise DataError(f"{path}: its schedule {choice['schedule']!r} is none of {', '.join(SCHEDULES)}. {fix}")
    if train_sha256 is not None and record.get("train_sha256") != train_sha256:
        raise DataError(f"{path}: was tuned for another compile of this folder (its train.onnx differs). {fix}")
    budget = record.get("budget")
    epochs = budget.get("epochs") if isinstance(budget, dict) and isinstance(budget.get("epochs"), int) else None
    return {"schedule": "constant", **choice, "epochs": epochs}   # records from before the schedule: tuned constant
