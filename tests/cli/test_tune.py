"""fgcompile tune: the rate it chooses is the one a manual sweep over the same split and seeds chooses;
its record (OUT/tune.json: rate and schedule) is what `train` then uses, an explicit --lr/--schedule wins;
bad input changes nothing."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
from click.testing import CliRunner

import fgcompile
from conftest import MODELS
from fgcompile.cli import main
from fgcompile.errors import SpecError
from fgcompile.report import describe_tune
from fgcompile.runtime import step as step_module
from fgcompile.spec import LR_GRIDS

CNN = MODELS / "digits_cnn" / "w8a8.onnx"
TRAIN = MODELS / "data" / "digits_target_train.npz"
EPOCHS = 2
ONE_THREAD = fgcompile.SessionSettings(threads=1)


@pytest.fixture(scope="module")
def compiled(target_train):
    # lr 0.5 is not in the grid, so the tuned rate always differs from the compiled one
    return fgcompile.compile_model(CNN, fgcompile.TrainSpec(m=8, lr=0.5, seed=3), calibration=target_train[0])


@pytest.fixture
def out(tmp_path, compiled):
    return fgcompile.write_compiled(compiled, tmp_path / "out")


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    return r


def manual_sweep(compiled, x, y, seed: int, holdout: float = 0.2):
    """The documented protocol through the public API: split with default_rng(seed), train each rate from
    the initial state, score the held-out examples, keep the best accuracy (then the lower loss)."""
    perm = np.random.default_rng(seed).permutation(len(y))
    k = round(holdout * len(y))
    fit, val = perm[k:], perm[:k]
    scores = {}
    for lr in LR_GRIDS[14]:                   # int8 at --bits 16 with headroom 4: a 14-bit grid
        trainer = fgcompile.Trainer(compiled, session=ONE_THREAD)
        trainer.fit((x[fit], y[fit]), epochs=EPOCHS, lr=lr, schedule="constant", progress=False)
        scores[lr] = trainer.evaluate(x[val], y[val])
    return max(scores, key=lambda lr: (scores[lr]["accuracy"], -scores[lr]["loss"], -lr)), scores


def test_tune_chooses_what_a_manual_sweep_chooses(out, compiled, target_train):
    record = fgcompile.tune(out, str(TRAIN), epochs=EPOCHS, session=ONE_THREAD, holdout=0.2, schedule="constant")
    choice, scores = manual_sweep(compiled, *target_train, seed=3)
    assert record["grid"] == list(LR_GRIDS[14])
    assert [(s["lr"], s["val_accuracy"], s["val_loss"]) for s in record["scores"]] == \
        [(lr, v["accuracy"], v["loss"]) for lr, v in scores.items()]
    assert record["choice"] == {"lr": choice, "lr_numerator": round(choice * 256), "schedule": "constant"}
    assert len({v["accuracy"] for v in scores.values()}) > 1      # the rates did differ
    assert record["split"] == {**record["split"], "seed": 3, "fit": 400, "validation": 100}
    assert json.loads((out / "tune.json").read_text()) == record


def test_folds_cross_validate_as_a_manual_k_fold_sweep(out, compiled, target_train):
    """--folds K: fold i validates perm[round(i·n/K):round((i+1)·n/K)] of the seeded permutation and fits
    the rest in permutation order; a rate's score is the mean over every (fold, seed) trial."""
    record = fgcompile.tune(out, str(TRAIN), epochs=1, folds=3, seeds=2, session=ONE_THREAD)
    x, y = target_train
    perm = np.random.default_rng(3).permutation(len(y))
    cuts = [0, 167, 333, 500]
    assert record["split"] == {**record["split"], "seed": 3, "folds": 3, "fit": [333, 334, 333],
                               "validation": [167, 166, 167]}
    expected = {}
    for lr in (LR_GRIDS[14][0], LR_GRIDS[14][-1]):          # two rates are enough to check the protocol
        runs = []
        for a, b in zip(cuts, cuts[1:]):
            fit, val = np.concatenate([perm[:a], perm[b:]]), perm[a:b]
            for seed in (3, 4):
                trainer = fgcompile.Trainer(compiled, session=ONE_THREAD)
                trainer.spec = dataclasses.replace(trainer.spec, seed=seed)   # as tune's trial seeds
                trainer.fit((x[fit], y[fit]), epochs=1, lr=lr, progress=False)
                runs.append(trainer.evaluate(x[val], y[val])["accuracy"])
        expected[lr] = runs
    scores = {s["lr"]: s for s in record["scores"]}
    for lr, runs in expected.items():
        assert [(r["fold"], r["seed"]) for r in scores[lr]["runs"]] == [(f, s) for f in range(3) for s in (3, 4)]
        assert [r["val_accuracy"] for r in scores[lr]["runs"]] == runs
        assert scores[lr]["val_accuracy"] == pytest.approx(np.mean(runs), abs=1e-12)
    best = max(record["scores"], key=lambda s: (s["val_accuracy"], -s["val_loss"], -s["lr"]))
    assert record["choice"]["lr"] == best["lr"]
    assert "by 3-fold cross-validation on 500 examples" in describe_tune(record)


def test_train_uses_the_tuned_rate_and_an_explicit_lr_wins(out, compiled, target_train):
    r = run("tune", out, "--data", TRAIN, "--epochs", 1, "--seed", 5, "--threads", 1)
    assert r.exit_code == 0, r.output
    record = json.loads((out / "tune.json").read_text())     # the defaults: 5 folds, the cosine schedule
    assert record["split"]["seed"] == 5 and record["split"]["folds"] == 5 and record["schedule"] == "cosine"
    assert record["budget"] == {"epochs": 1, "batch": 32, "seeds": [5]}
    tuned = record["choice"]["lr"]
    assert f"lr {tuned:g} chosen of {', '.join(f'{lr:g}' for lr in [*LR_GRIDS[14], 256])}" in r.output

    r = run("train", out, "--data", TRAIN, "--epochs", 1, "--json", "--threads", 1)
    assert r.exit_code == 0, r.output
    assert f"note: lr {tuned:g} and the cosine schedule from {out / 'tune.json'}" in r.output
    trained = np.load(out / "checkpoint.npz")
    same = fgcompile.Trainer(compiled, session=ONE_THREAD)      # the same run at the tuned rate, in memory
    same.fit(target_train, epochs=1, lr=tuned, progress=False)
    assert all(np.array_equal(trained[k], v) for k, v in same.state.items())
    assert json.loads(str(trained["__meta__"]))["run"]["lr_numerator"] == round(tuned * 256)

    r = run("train", out, "--data", TRAIN, "--epochs", 1, "--restart", "--lr", 2, "--quiet", "--threads", 1)
    assert r.exit_code == 0 and "lr 2" not in r.output and "the cosine schedule from" in r.output
    assert json.loads(str(np.load(out / "checkpoint.npz")["__meta__"]))["run"]["lr_numerator"] == 512
    r = run("train", out, "--data", TRAIN, "--epochs", 2, "--resume", "--quiet")   # tune.json's rate again
    assert r.exit_code == 2 and "lr_numerator 512 -> " in r.output


def test_train_warns_when_its_epochs_are_not_the_tuned_ones(out):
    assert run("tune", out, "--data", TRAIN, "--epochs", 1, "--holdout", 0.2, "--threads", 1).exit_code == 0
    r = run("train", out, "--data", TRAIN, "--epochs", 2, "--quiet", "--threads", 1)
    assert r.exit_code == 0, r.output
    assert "Warning: that rate was tuned for 1 epochs and this run trains 2" in r.output
    assert f"run `fgcompile tune {out} --data TRAIN.npz --epochs 2` first" in r.output
    r = run("train", out, "--data", TRAIN, "--epochs", 1, "--restart", "--quiet", "--threads", 1)
    assert r.exit_code == 0 and "from " + str(out / "tune.json") in r.output and "Warning" not in r.output
    r = run("train", out, "--data", TRAIN, "--epochs", 2, "--restart", "--lr", 2, "--quiet", "--threads", 1)
    assert r.exit_code == 0 and "Warning" not in r.output        # an explicit rate is the user's choice


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def unlocked(files):
    """A snapshot without the folder lock's pid file, which every train run rewrites."""
    return {k: v for k, v in files.items() if k != ".fgcompile.lock"}


def small(tmp_path):
    d = np.load(TRAIN)
    np.savez(tmp_path / "small.npz", x=d["x"][:40], y=d["y"][:40])
    return tmp_path / "small.npz"


def one_class(tmp_path):
    d = np.load(TRAIN)
    np.savez(tmp_path / "one.npz", x=d["x"], y=np.full_like(d["y"], 3))
    return tmp_path / "one.npz"


BAD = {
    "missing data": (lambda tmp: ["--data", tmp / "nope.npz"], "nope.npz: no such file"),
    "too small to split": (lambda tmp: ["--data", small(tmp), "--holdout", 0.2],
                           "holds 40 examples; --holdout 0.2 leaves 32 to fit and 8"),
    "zero epochs": (lambda tmp: ["--data", TRAIN, "--epochs", 0], "--epochs 0: must be at least 1"),
    "zero seeds": (lambda tmp: ["--data", TRAIN, "--seeds", 0], "--seeds 0: must be at least 1"),
    "holdout 1": (lambda tmp: ["--data", TRAIN, "--holdout", 1], "--holdout 1.0: the share of the data held out"),
    "wrong shape": (lambda tmp: ["--data", MODELS / "data" / "kws_target_train.npz"], "the model input is"),
    "holdout and folds": (lambda tmp: ["--data", TRAIN, "--holdout", 0.3, "--folds", 5],
                          "--holdout 0.3 with --folds 5: K folds each hold out 1/K of the data; pass one"),
    "zero folds": (lambda tmp: ["--data", TRAIN, "--folds", 0], "--folds 0: must be at least 2"),
    "one fold": (lambda tmp: ["--data", TRAIN, "--folds", 1],
                 "--folds 1: must be at least 2 (or use --holdout F for one split"),
    "one fold and a holdout": (lambda tmp: ["--data", TRAIN, "--folds", 1, "--holdout", 0.2],
                               "--folds 1: must be at least 2 (or use --holdout F for one split"),
    "one class": (lambda tmp: ["--data", one_class(tmp), "--holdout", 0.2],
                  "one.npz: all 500 labels are class 3; a rate chosen on one class is meaningless"),
    "folds too small": (lambda tmp: ["--data", small(tmp), "--folds", 5],
                        "holds 40 examples; --folds 5 leaves 32 to fit and 8 to validate"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_and_leaves_the_folder_unchanged(tmp_path, out, case):
    args, message = BAD[case]
    args = args(tmp_path)
    (out / "tune.json").write_text('{"an": "earlier record"}')
    before = snapshot(out)
    r = run("tune", out, *args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert snapshot(out) == before


def test_train_refuses_a_damaged_or_foreign_record(out):
    (out / "tune.json").write_text("{not json")
    r = run("train", out, "--data", TRAIN, "--epochs", 1, "--quiet")
    assert r.exit_code == 2 and "tune.json: not a record fgcompile tune wrote" in r.output
    record = {"format": "fgcompile-tune/1", "choice": {"lr": 8.0, "lr_numerator": 2048}, "train_sha256": "0" * 64}
    (out / "tune.json").write_text(json.dumps(record))
    r = run("train", out, "--data", TRAIN, "--epochs", 1, "--quiet")
    assert r.exit_code == 2 and "was tuned for another compile" in r.output
    assert not (out / "checkpoint.npz").exists()


def cosine_numerators(peak: int, total: int) -> list[int]:
    """The cosine schedule as README states it: lr_k = max(1, round(peak · (1 + cos(π k / total)) / 2))."""
    return [max(1, round(peak * 0.5 * (1 + math.cos(math.pi * k / total)))) for k in range(total)]


def test_tune_under_cosine_records_it_and_train_feeds_the_graph_that_schedule(out, compiled, target_train,
                                                                             monkeypatch):
    r = run("tune", out, "--data", TRAIN, "--epochs", 1, "--schedule", "cosine", "--holdout", 0.2, "--threads", 1)
    assert r.exit_code == 0, r.output
    record = json.loads((out / "tune.json").read_text())
    tuned, peak = record["choice"]["lr"], record["choice"]["lr_numerator"]
    assert record["schedule"] == record["choice"]["schedule"] == "cosine"
    assert record["grid"] == [*LR_GRIDS[14], 2 * LR_GRIDS[14][-1]]     # cosine's mean rate is half its peak
    assert "(the peak of a cosine schedule)" in r.output
    # the trial of the chosen rate was a cosine run from that peak on the documented split (seed 3)
    x, y = target_train
    perm = np.random.default_rng(3).permutation(len(y))
    fit, val = perm[100:], perm[:100]
    scores = {s["lr"]: s for s in record["scores"]}
    for schedule in ("cosine", "constant"):
        trial = fgcompile.Trainer(compiled, session=ONE_THREAD)
        trial.fit((x[fit], y[fit]), epochs=1, lr=tuned, schedule=schedule, progress=False)
        same = trial.evaluate(x[val], y[val])["loss"] == scores[tuned]["val_loss"]
        assert same == (schedule == "cosine")

    fed = []                               # the lr input of every step the graph runs
    feeds = step_module.step_feeds
    monkeypatch.setattr(step_module, "step_feeds", lambda c, xb, yb, seed, step, lr, state:
                        fed.append(lr) or feeds(c, xb, yb, seed, step, lr, state))
    total = 2 * (len(y) // 32)
    r = run("train", out, "--data", TRAIN, "--epochs", 2, "--quiet", "--threads", 1)
    assert r.exit_code == 0, r.output
    assert f"note: lr {tuned:g} and the cosine schedule from {out / 'tune.json'}" in r.output
    assert fed == cosine_numerators(peak, total) and fed[0] == peak and fed[-1] < peak / 100
    assert json.loads(str(np.load(out / "checkpoint.npz")["__meta__"]))["run"]["schedule"] == "cosine"

    fed.clear()                            # an explicit --schedule wins; the note says what was tuned
    r = run("train", out, "--data", TRAIN, "--epochs", 2, "--restart", "--schedule", "constant", "--quiet",
            "--threads", 1)
    assert r.exit_code == 0, r.output
    assert fed == [peak] * total and "tuned under the cosine schedule, not constant" in r.output

    before = snapshot(out)                 # resuming that run without flags would switch to tune.json's cosine
    r = run("train", out, "--data", TRAIN, "--epochs", 2, "--resume", "--quiet")
    assert r.exit_code == 2 and "schedule constant -> cosine" in r.output and "Traceback" not in r.output
    assert unlocked(snapshot(out)) == unlocked(before)


def test_bad_schedules_are_refused_and_change_nothing(out):
    (out / "tune.json").write_text('{"an": "earlier record"}')
    before = snapshot(out)
    r = run("tune", out, "--data", TRAIN, "--schedule", "linear")
    assert r.exit_code == 2 and "Invalid value for '--schedule'" in r.output and "'linear'" in r.output
    with pytest.raises(SpecError, match="--schedule 'linear': choose constant or cosine"):
        fgcompile.tune(out, str(TRAIN), schedule="linear")
    assert snapshot(out) == before
    record = {"format": "fgcompile-tune/1", "choice": {"lr": 8.0, "lr_numerator": 2048, "schedule": "linear"},
              "train_sha256": fgcompile.Trainer(out).train_sha256}
    (out / "tune.json").write_text(json.dumps(record))
    before = snapshot(out)
    r = run("train", out, "--data", TRAIN, "--epochs", 1, "--quiet")
    assert r.exit_code == 2 and "tune.json: its schedule 'linear' is none of constant, cosine" in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert unlocked(snapshot(out)) == unlocked(before)
