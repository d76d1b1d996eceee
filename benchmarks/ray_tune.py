"""tune's wall time on local processes against Ray (`tune --backend ray`), and how Ray's scales with workers.

    python benchmarks/ray_tune.py [--epochs 3] [--repeats 2]     (needs the ray extra)

The job is the demo's tune: the shipped digits CNN compiled as the demo compiles it (whitened on its
training data), 9 rates x 5 folds x 1 seed on the 500 target training examples. Each row is the best of
`repeats` runs of fgcompile.tune on the compiled folder, with onnxruntime's default threads and with one:
    local          the trials one after another in this process (the default backend)
    ray, N CPUs    a local Ray instance of N CPUs started beforehand (its start is timed on its own): N
                   workers, one trial each at a time; "workers simulated on one host"
The ratio is ray / local on the same 2 CPUs (the issue asks for at most 1.2); each Ray record is checked
equal to the local one (apart from its time), so a faster wrong answer cannot pass.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import numpy as np

import fgcompile
from fgcompile import models

DATA = models.ROOT / "data" / "digits_target_train.npz"


def timed_tune(out, repeats: int, **kw) -> tuple[float, dict]:
    """(best wall seconds, the record without its time) of `repeats` tunes of OUT."""
    best, record = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        record = fgcompile.tune(out, str(DATA), **kw)
        best = min(best, time.perf_counter() - t0)
    record.pop("seconds")
    return best, record


def measure(epochs: int = 3, repeats: int = 2, cpus=(1, 2), threads=(0, 1)) -> dict:
    """{"seconds": {(threads, backend): best wall seconds}, ...}; threads 0 is onnxruntime's default."""
    import ray
    x = np.load(DATA)["x"]
    rows, starts, local = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "digits"
        fgcompile.write_compiled(fgcompile.compile_model(models.ROOT / "digits_cnn" / "w8a8.onnx", calibration=x),
                                 out)
        kw = {t: dict(epochs=epochs, seeds=1, folds=5, session=fgcompile.SessionSettings(threads=t)) for t in threads}
        for t in threads:
            rows[t, "local"], local[t] = timed_tune(out, repeats, **kw[t])
        for n in cpus:
            t0 = time.perf_counter()
            ray.init(address="local", num_cpus=n, log_to_driver=False, logging_level="ERROR")
            starts[n] = time.perf_counter() - t0
            try:
                for t in threads:
                    rows[t, f"ray, {n} CPU{'s' if n > 1 else ''}"], record = timed_tune(out, repeats, backend="ray",
                                                                                         **kw[t])
                    assert record == local[t], "the Ray record differs from the local one"
            finally:
                ray.shutdown()
        first = local[threads[0]]
        trials = len(first["scores"]) * len(first["scores"][0]["runs"])
    return {"seconds": rows, "ray_start_seconds": starts, "trials": trials, "epochs": epochs,
            "cpus_here": os.cpu_count()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    r = measure(args.epochs, args.repeats)
    print(f"tune of the digits CNN: {r['trials']} trials of {r['epochs']} epochs; {r['cpus_here']} CPUs here; "
          f"best of {args.repeats}; every Ray record equals the local one")
    for t in sorted({t for t, _ in r["seconds"]}):
        local = r["seconds"][t, "local"]
        print(f"--threads {t}{' (onnxruntime default)' if t == 0 else ''}:")
        for (threads, name), seconds in r["seconds"].items():
            if threads == t:
                print(f"  {name:12s} {seconds:6.2f} s   {seconds / local:5.2f}x local")
        one, two = r["seconds"].get((t, "ray, 1 CPU")), r["seconds"].get((t, "ray, 2 CPUs"))
        if one and two:
            print(f"  scaling 1 -> 2 workers: {one / two:.2f}x faster")
    print("ray start (not in the rows): " + ", ".join(f"{n} CPU{'s' if n > 1 else ''} {s:.1f} s"
                                                      for n, s in r["ray_start_seconds"].items()))
