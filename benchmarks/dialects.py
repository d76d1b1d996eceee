"""Dialect corpus: compile, train a few steps and export every model that models/recipes/build_dialects.py
builds (2 architectures x each dialect), and measure what each costs.

    python benchmarks/dialects.py [--steps 3] [--batch 32]

Per model: node count of the source, of its canonical form (passes/canonicalize.py) and of the training
graph; one training step (m = 8, the last layer with its bias) against one forward of the source model on
the same batch, in the same process, interleaved (step_cost.timed); target-test accuracy of the exported
model after `steps` steps against the source's (a check that export works, not a training result).
Prints a markdown table and writes benchmarks/results/dialects.md.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np
import onnxruntime as ort

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models" / "recipes"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import build_dialects  # noqa: E402
from fgcompile.compiler import compile_model, write_compiled  # noqa: E402
from fgcompile.runtime.export import export_model  # noqa: E402
from fgcompile.session import make_session  # noqa: E402
from fgcompile.runtime.trainer import Trainer  # noqa: E402
from fgcompile.spec import TrainSpec  # noqa: E402
from step_cost import step_feeds, timed  # noqa: E402


def accuracy(model, x, y) -> float:
    sess = make_session(model, 1)
    return float((sess.run(None, {"x": x})[0].argmax(1) == y).mean())


def one(arch, dialect, data, test, steps, batch, tmp) -> dict:
    import onnx
    source = build_dialects.build(arch, dialect)
    compiled = compile_model(source, TrainSpec())
    out = write_compiled(compiled, tmp / f"{arch}_{dialect}")
    x, y = data
    Trainer(out, threads=1).fit((x[:steps * batch], y[:steps * batch]), epochs=1, batch=batch, progress=False)
    export_model(out, tmp / f"{arch}_{dialect}.onnx")
    exported = onnx.load(str(tmp / f"{arch}_{dialect}.onnx"))
    xb, yb = x[:batch], y[:batch]
    infer, train = make_session(source, 1), make_session(compiled.train, 1, training=True)
    feeds = step_feeds(compiled.contract, xb, yb, 1, dict(compiled.state))
    t = timed({"forward": lambda: infer.run(None, {"x": xb}), "step": lambda: train.run(None, feeds)},
              repeats=15, calls=40)
    return {"arch": arch, "dialect": dialect, "notes": "; ".join(compiled.notes) or "-",
            "trains": ", ".join(f"{s.name} ({s.dtype})" for s in compiled.contract.state),
            "nodes": (len(source.graph.node), len(compiled.source.graph.node), len(compiled.train.graph.node)),
            "step_us": t["step"], "forward_us": t["forward"],
            "acc": (accuracy(source, *test), accuracy(exported, *test))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    ort.set_default_logger_severity(3)
    load = lambda split: tuple(np.load(ROOT / "models" / "data" / f"digits_{split}.npz")[k] for k in ("x", "y"))
    data, test = load("target_train"), load("target_test")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in build_dialects.ARCHS:
            for dialect in build_dialects.DIALECTS:
                r = one(arch, dialect, data, test, args.steps, args.batch, pathlib.Path(tmp))
                rows.append(r)
                print(f"{arch} {dialect}: step/forward {r['step_us'] / r['forward_us']:.2f}", file=sys.stderr)
    lines = ["| model | dialect | nodes: source / canonical / train | step / forward (µs) | trains | "
             f"target acc: source → exported after {args.steps} steps |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['dialect']} | {' / '.join(map(str, r['nodes']))} | "
                     f"{r['step_us'] / r['forward_us']:.2f}× ({r['step_us']:.0f} / {r['forward_us']:.0f}) | "
                     f"{r['trains']} | {100 * r['acc'][0]:.1f}% → {100 * r['acc'][1]:.1f}% |")
    text = "\n".join(lines) + f"\n\nonnxruntime {ort.__version__}, 1 thread, batch {args.batch}, m = 8.\n"
    print(text)
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "results" / "dialects.md").write_text(text)


if __name__ == "__main__":
    main()
