"""Memory: peak resident set of a process that trains, against one that only infers and one that
backpropagates, on the same model and batch. Each runs in its own fresh subprocess (this file run as
a script), imports only what its job needs, does 20 iterations, and reports

    baseline  VmRSS after its imports, before any model is loaded (interpreter + libraries)
    peak      VmHWM at the end (the high-water mark of the whole process)
so `peak − baseline` is what the model, its activations and its optimizer state cost.

Jobs:  inference  onnxruntime session of the original model
       training   onnxruntime session of train.onnx, state fed back each step (what a device runs)
       trainer    fgcompile's Trainer.fit on the compiled folder (the CLI's path, fgcompile imported)
       backprop   torch autograd over the fp32 model, the same tensors trainable, Adam (or SGD)
       mezo       MeZO in torch over the fp32 model (benchmarks/mezo.py): 2m forwards, no autograd
       compile    fgcompile's compile_model + write_compiled of a spec (the compile's own peak)
`measure` can stop a job at a wall-time or resident-memory limit (raising JobLimit), so a benchmark
records "needs > 8 GB" or "over 5 minutes" as its result instead of swapping or hanging.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile
import time

ITERATIONS = 20
HERE = pathlib.Path(__file__).resolve().parent


class JobLimit(RuntimeError):
    """A job passed measure's timeout or limit_mb and was killed."""


def measure(job: str, timeout: float = 600, limit_mb: float | None = None, **args) -> dict:
    """Run one job in a fresh interpreter; returns {"baseline_mb", "peak_mb", "model_mb", "seconds"}.
    Raises JobLimit when it runs past `timeout` seconds or its resident set passes `limit_mb`."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:   # a pipe could fill and block
        proc = subprocess.Popen([sys.executable, str(HERE / "memory.py"), job, json.dumps(args)], stdout=out,
                                stderr=err, text=True)
        status = pathlib.Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            limit = f"over {timeout:.0f} s" if time.perf_counter() - t0 > timeout else None
            try:
                if limit_mb and _status_mb("VmRSS", status) > limit_mb:
                    limit = f"over {limit_mb / 1024:g} GB"
            except FileNotFoundError:   # it ended since the poll
                pass
            if limit:
                proc.kill()
                proc.wait()
                raise JobLimit(f"memory job {job} stopped: {limit}")
            time.sleep(0.05)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"memory job {job} failed:\n{err.read()[-2000:]}")
        return json.loads(out.read().strip().splitlines()[-1]) | {"seconds": round(time.perf_counter() - t0, 1)}


def _status_mb(key: str, path="/proc/self/status") -> float:
    for line in open(path):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    if str(path) != "/proc/self/status":   # a zombie's status has no Vm lines: it holds no memory
        return 0.0
    raise RuntimeError(f"/proc/self/status has no {key} (the memory benchmark needs Linux)")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child would report its parent's peak
    return _status_mb("VmHWM")


def _batch(data: str, batch: int):
    import numpy as np
    d = np.load(data)
    return d["x"][:batch], d["y"][:batch]


def _session(path: str, training: bool = False):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if training:   # as fgcompile's runtime runs train.onnx (fgcompile.session.TRAINING_MEMORY_PATTERN; not
        opts.enable_mem_pattern = False   # imported here: onnx would join this job's resident set)
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _inference(model: str, data: str, batch: int, iterations: int = ITERATIONS):
    import numpy  # noqa: F401  (the same imports as the training job, so the baselines compare)
    import onnxruntime  # noqa: F401
    base = _rss_mb()
    x, _ = _batch(data, batch)
    sess = _session(model)
    name = sess.get_inputs()[0].name
    for _ in range(iterations):
        sess.run(None, {name: x})
    return base


def _training(compiled: str, data: str, batch: int, iterations: int = ITERATIONS, planned: bool = False):
    """planned: onnxruntime's memory pattern on (its default), as the runtime ran train.onnx before"""
    import numpy as np
    import onnxruntime  # noqa: F401
    base = _rss_mb()
    x, y = _batch(data, batch)
    sess = _session(str(pathlib.Path(compiled) / "train.onnx"), training=not planned)
    contract = json.loads(sess.get_modelmeta().custom_metadata_map["fgcompile"])
    with np.load(pathlib.Path(compiled) / "state.npz") as f:
        state = {s["name"]: f[s["name"]] for s in contract["state"]}
    io, outputs = contract["inputs"], [o.name for o in sess.get_outputs()]
    for k in range(iterations):
        out = dict(zip(outputs, sess.run(outputs, {io["data"]: x, io["labels"]: y, io["seed"]: np.array(0, np.int32),
                                                   io["step"]: np.array(k, np.int32),
                                                   io["lr"]: np.array(contract["lr_numerator"]["default"], np.int32), **state})))
        state = {s["name"]: out[s["output"]] for s in contract["state"]}
    return base


def _trainer(compiled: str, data: str, batch: int):
    from fgcompile.runtime.trainer import Trainer
    base = _rss_mb()
    x, y = _batch(data, batch)
    trainer = Trainer(compiled, threads=1)
    trainer.fit((x, y), epochs=ITERATIONS, batch=batch, progress=False, checkpoint_every=10 ** 9)
    return base


def _backprop(model: str, trained: list, data: str, batch: int, iterations: int = ITERATIONS,
              optimizer: str = "adam"):
    import onnx
    import torch
    sys.path.insert(0, str(HERE))
    from backprop import OnnxTorch
    torch.set_num_threads(1)
    base = _rss_mb()
    x, y = _batch(data, batch)
    net = OnnxTorch(onnx.load(model), trained)
    params = list(net.params.values())
    opt = torch.optim.Adam(params, 1e-3) if optimizer == "adam" else torch.optim.SGD(params, 1e-3)
    xs, ys = torch.tensor(x), torch.tensor(y)
    for _ in range(iterations):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xs), ys).backward()
        opt.step()
    return base


def _mezo(model: str, trained: list, data: str, batch: int, m: int, iterations: int = ITERATIONS):
    import onnx
    import torch
    sys.path.insert(0, str(HERE))
    from backprop import OnnxTorch
    from mezo import mezo_step
    torch.set_num_threads(1)
    base = _rss_mb()
    x, y = _batch(data, batch)
    net = OnnxTorch(onnx.load(model), trained)
    params = [p.requires_grad_(False) for p in net.params.values()]
    xs, ys = torch.tensor(x), torch.tensor(y)
    for k in range(iterations):
        mezo_step(params, lambda: torch.nn.functional.cross_entropy(net(xs), ys), m, 1e-3, 1e-6, k)
    return base


def _compile(model: str, spec: dict, out: str):
    from fgcompile.compiler import compile_model, write_compiled
    base = _rss_mb()
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}   # JSON made `train` a list
    write_compiled(compile_model(model, spec), out)
    return base


JOBS = {"inference": _inference, "training": _training, "trainer": _trainer, "backprop": _backprop, "mezo": _mezo,
        "compile": _compile}

if __name__ == "__main__":
    job, args = sys.argv[1], json.loads(sys.argv[2])
    baseline = JOBS[job](**args)
    peak = _peak_mb()
    print(json.dumps({"baseline_mb": round(baseline, 1), "peak_mb": round(peak, 1),
                      "model_mb": round(peak - baseline, 1)}))
