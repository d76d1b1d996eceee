"""onnxruntime-training's backprop of named tensors of an fp32 ONNX model (SGD, cross-entropy), timed and
measured in its own process: run by an interpreter that has onnxruntime-training, which replaces the
onnxruntime package, so it cannot share a process (or a venv) with the one fgcompile is timed on.

    python benchmarks/ort_training.py '{"model": "fp32.onnx", "trained": [...], "data": "x.npz", "repeats": 3}'
prints {"ms": median ms per step over `repeats` steps after one warm-up, "baseline_mb", "peak_mb", "model_mb"}.
"""
import json
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime
from onnxruntime.training import artifacts
from onnxruntime.training.api import CheckpointState, Module, Optimizer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from memory import _peak_mb, _rss_mb  # noqa: E402


def main(model: str, trained: list, data: str, repeats: int) -> dict:
    base = _rss_mb()
    fp32 = onnx.load(model)
    frozen = [i.name for i in fp32.graph.initializer if i.name not in trained]
    with tempfile.TemporaryDirectory() as tmp:
        artifacts.generate_artifacts(fp32, requires_grad=trained, frozen_params=frozen,
                                     loss=artifacts.LossType.CrossEntropyLoss, optimizer=artifacts.OptimType.SGD,
                                     artifact_directory=tmp)
        state = CheckpointState.load_checkpoint(f"{tmp}/checkpoint")
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = 1   # as every other column
        module = Module(f"{tmp}/training_model.onnx", state, f"{tmp}/eval_model.onnx", session_options=opts)
        opt = Optimizer(f"{tmp}/optimizer_model.onnx", module)
        opt.set_learning_rate(1e-3)
        module.train()
        with np.load(data) as d:
            x, y = d["x"], d["y"]

        def step():
            module(x, y)
            opt.step()
            module.lazy_reset_grad()
        step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return {"ms": round(statistics.median(times) * 1e3, 1), "baseline_mb": round(base, 1),
            "peak_mb": round(_peak_mb(), 1), "model_mb": round(_peak_mb() - base, 1)}


if __name__ == "__main__":
    print(json.dumps(main(**json.loads(sys.argv[1]))))
