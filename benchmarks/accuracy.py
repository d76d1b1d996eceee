"""Accuracy: target-domain test accuracy after adaptation, QZO-FF against fp32 backprop of the same
tensors, from the same start, on the same examples in the same order.

Protocol (both methods alike):
- the tensors: what `fgcompile compile` trains by default (the last layer); backprop trains the same
  tensors of the fp32 model, found through the node they feed;
- the budget: `epochs` passes over the target train split in batches of `batch`, the Trainer's order;
- the learning rate: chosen from a grid by validation accuracy (train on 400 target-train examples,
  validate on the other 100, mean over seeds; with `folds` K > 1, K-fold cross-validation: fold i
  validates on the i-th 100 examples of one fixed permutation and trains on the rest, and the score is
  the mean over every (fold, seed) pair); the chosen rate is then trained on all 500 and scored once on
  the target test split. Nothing is tuned on the test split.
"""
from __future__ import annotations

import statistics
import tempfile

import numpy as np
import onnx

from fgcompile.compiler import compile_model, write_compiled
from fgcompile.runtime.export import export_model
from fgcompile.runtime.metrics import score
from fgcompile.session import make_session
from fgcompile.runtime.trainer import Trainer
from fgcompile.spec import TrainSpec

VALIDATION = 100


def holdout(x: np.ndarray, y: np.ndarray, fold: int = 0):
    """(train, validation) split of the target train data, fixed across methods and seeds: fold i
    validates on the i-th VALIDATION examples of one permutation (fold 0: the split of every earlier
    result file)."""
    perm = np.random.default_rng(12345).permutation(len(y))
    if not 0 <= fold < len(y) // VALIDATION:
        raise ValueError(f"fold {fold}: {len(y)} examples hold {len(y) // VALIDATION} folds of {VALIDATION}")
    va = perm[fold * VALIDATION:(fold + 1) * VALIDATION]
    tr = np.concatenate([perm[:fold * VALIDATION], perm[(fold + 1) * VALIDATION:]])
    return (x[tr], y[tr]), (x[va], y[va])


def qzo_ff(source: onnx.ModelProto, spec: TrainSpec, train, test, epochs: int, batch: int,
           schedule: str = "constant", exported: bool = False):
    """Test accuracy of the trained state; with `exported`, (trained, exported model's) accuracies.
    Preconditioning calibrates on the inputs of `train` only (never on `test`)."""
    compiled = compile_model(source, spec, calibration=train[0])
    with tempfile.TemporaryDirectory() as tmp:
        write_compiled(compiled, f"{tmp}/compiled")
        trainer = Trainer(f"{tmp}/compiled", threads=1)
        trainer.fit(train, epochs=epochs, batch=batch, progress=False, checkpoint_every=10 ** 9, schedule=schedule)
        trained = trainer.evaluate(*test)["accuracy"]
        if not exported:
            return trained
        export_model(f"{tmp}/compiled", f"{tmp}/adapted.onnx")
        return trained, untrained(onnx.load(f"{tmp}/adapted.onnx"), test)


def untrained(source: onnx.ModelProto, test) -> float:
    data = source.graph.input[0].name
    return score(make_session(source, 1), data, test[0], test[1], {})["accuracy"]


def fp32_names(quantized: onnx.ModelProto, fp32: onnx.ModelProto, trained: list[str]) -> list[str]:
    """The fp32 initializers that the quantized `trained` tensors stand for: the same input of the
    same-named node (quantizers keep node names; each trained tensor reaches its node through a DQ)."""
    dq_out = {n.input[0]: n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    names = []
    for t in trained:
        hit = [(n.name, i) for n in quantized.graph.node for i, x in enumerate(n.input) if x == dq_out.get(t)]
        if not hit or hit[0][0] not in fp32_nodes:
            raise ValueError(f"cannot find the fp32 counterpart of {t!r}: no node of the fp32 model has the "
                             "name of the node it feeds")
        node, i = hit[0]
        names.append(fp32_nodes[node].input[i])
    return names


def select(run, grid: list, seeds: list[int], train, epochs: int, batch: int, folds: int = 1) -> tuple[object, dict]:
    """The grid value with the best mean validation accuracy over seeds and folds, and all validation
    scores."""
    splits = [holdout(*train, fold) for fold in range(folds)]
    scores = {lr: statistics.mean(run(lr, seed, fit, val, epochs, batch) for fit, val in splits for seed in seeds)
              for lr in grid}
    return max(grid, key=lambda lr: scores[lr]), scores


def summary(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "runs": [round(v, 4) for v in values]}
