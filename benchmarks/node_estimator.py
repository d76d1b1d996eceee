"""Node perturbation against the default estimator on digits_cnn (issue #25, first slice).

Per (depth, estimator): compile with the training data as whitening calibration, as `adapt` does (the
default estimator reparametrizes the weight; node preconditions its step, ΔW ∝ P²·ĝ; --no-whitening turns
both off), choose the rate with `tune` (5 folds, the run's
epochs, on seed 0's compile), train each seed on all of the target train split, export, and score the
exported model on the target test split. One JSON line per run on stdout.

    python benchmarks/node_estimator.py --epochs 30 --seeds 0 1 2 --last 2 1
    python benchmarks/node_estimator.py --epochs 30 --seeds 0 1 2 --last 3 4 --estimators node node-alternate sign

node-alternate: --node-schedule alternate (direction i perturbs trained layer i mod L only).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import onnx

import fgcompile
from fgcompile.session import SessionSettings

ESTIMATORS = {"node": dict(estimator="node", m=8), "node-alternate": dict(estimator="node", m=8, node_schedule="alternate"),
              "sign": dict()}


def run(last: int, name: str, seeds: list[int], epochs: int, model: str, whiten: bool = True) -> None:
    train, test = np.load("models/data/digits_target_train.npz"), "models/data/digits_target_test.npz"
    data = (train["x"], train["y"])
    rate = None
    for seed in seeds:
        start = time.time()
        spec = fgcompile.TrainSpec(last=last, seed=seed, **ESTIMATORS[name])
        compiled = fgcompile.compile_model(onnx.load(model), spec, calibration=train["x"] if whiten else None)
        trainer = fgcompile.Trainer(compiled, session=SessionSettings(threads=1))
        if rate is None:
            choice = fgcompile.tune(trainer, data, epochs=epochs, folds=5)
            rate = choice["choice"]["lr"]
        trainer.fit(data, epochs=epochs, lr=rate, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            fgcompile.export_model(trainer, f"{tmp}/adapted.onnx")
            acc = fgcompile.evaluate(f"{tmp}/adapted.onnx", test)
        print(json.dumps({"model": model, "last": last, "estimator": name, "spec": ESTIMATORS[name], "seed": seed,
                          "whitened": compiled.contract.spec.precondition == "whiten", "epochs": epochs, "lr": rate, "exported_accuracy": acc["accuracy"], "seconds": round(time.time() - start, 1)}),
              flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--last", type=int, nargs="+", default=[2, 1])
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    p.add_argument("--model", default="models/digits_cnn/w8a8.onnx")
    p.add_argument("--no-whitening", action="store_true")
    a = p.parse_args()
    for last in a.last:
        for name in a.estimators:
            run(last, name, a.seeds, a.epochs, a.model, not a.no_whitening)
