"""What --forward exact costs: a training step compiled with --forward exact against the default
--forward qdq, beside one int8 inference forward of the source model, all in one process.

    python benchmarks/exact_forward.py            # shipped models + bench models (dscnn, mobilenetv2, resnet18)
    python benchmarks/exact_forward.py --quick    # shipped models + dscnn

--forward qdq keeps the source's DQ→Conv/Gemm/MatMul→Q ops, which onnxruntime fuses into int8 kernels
(QLinearConv, QGemm, …); --forward exact rewrites the frozen ones into float kernels on integer-valued tensors
(or ConvInteger/MatMulInteger) plus one float requantization, and Adds/means into int32 fixed point
(passes/exact_forward.py), so that every runtime computes the same values, and onnxruntime no longer fuses them.

Per model and trained part (the classifier: TrainSpec(); two sites: TrainSpec(last=2)), at batch 32 and one
intra-op thread, onnxruntime's default optimization (ORT_ENABLE_ALL):
    forward     one inference forward of the source w8a8 model
    step qdq    one training step compiled with the defaults (estimator auto; no calibration, so no whitening)
    step exact  the same spec with forward="exact"
ms per call, every column of a model interleaved round-robin (benchmarks/step_cost.py's `timed`, median of
--repeats blocks), the steps fed as the Trainer feeds them (step_cost.step_feeds: a new step number each call,
the previous step's state fed back). Inputs: the shipped models' target-train data; the bench models N(0,1)
inputs of their input shape and random labels. A compile that fails is recorded with its error.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

import click
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from deep import data as random_data  # noqa: E402
from fgcompile import modelio  # noqa: E402
from fgcompile.compiler import compile_model  # noqa: E402
from fgcompile.runtime.data import load_data  # noqa: E402
from fgcompile.session import make_session  # noqa: E402
from fgcompile.spec import TrainSpec  # noqa: E402
from run import machine  # noqa: E402
from step_cost import step_feeds, timed  # noqa: E402

ROOT = HERE.parent
BENCH = pathlib.Path.home() / ".cache" / "fgcompile-bench"
BATCH = 32
# name: (model path, data file or None for random inputs)
SHIPPED = {"digits_cnn": (ROOT / "models/digits_cnn/w8a8.onnx", ROOT / "models/data/digits_target_train.npz"),
           "kws_dscnn": (ROOT / "models/kws_dscnn/w8a8.onnx", ROOT / "models/data/kws_target_train.npz"),
           "digits_attn": (ROOT / "models/digits_attn/w8a8.onnx", ROOT / "models/data/digits_target_train.npz")}
BENCH_MODELS = {name: (BENCH / name / "w8a8.onnx", None) for name in ("dscnn", "mobilenetv2_1000", "resnet18_1000")}
PARTS = {"last 1": {}, "last 2": {"last": 2}}


def inputs(source, npz):
    if npz is None:
        return random_data(source, BATCH)
    shape = [None] + [d.dim_value for d in source.graph.input[0].type.tensor_type.shape.dim[1:]]
    classes = source.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    x, y = load_data(npz, shape, classes)
    return x[:BATCH], y[:BATCH]


def stepper(compiled, x, y):
    """One training step per call, as the Trainer runs it (step_cost.measure's loop)."""
    contract = compiled.contract
    train = make_session(compiled.train, 1, training=True)
    outputs, state, step_no = [o.name for o in train.get_outputs()], dict(compiled.state), [0]

    def step():
        step_no[0] += 1
        out = dict(zip(outputs, train.run(outputs, step_feeds(contract, x, y, step_no[0], state))))
        state.update({s.name: out[s.output] for s in contract.state})
    return step


def error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())[:300]


def run_model(name: str, path: pathlib.Path, npz, repeats: int) -> list[dict]:
    source = modelio.load_model(str(path))
    x, y = inputs(source, npz)
    infer, data_name = make_session(source, 1), source.graph.input[0].name
    fns = {"forward": lambda: infer.run(None, {data_name: x})}
    rows = {}
    for part, options in PARTS.items():
        row = rows[part] = {"model": name, "trained": part, "batch": len(y), "compile_s": {}, "errors": {},
                            "notes": {}}
        for forward in ("qdq", "exact"):
            t0 = time.perf_counter()
            try:
                compiled = compile_model(source, TrainSpec(**options, forward=forward))
            except Exception as exc:   # record, do not fix: the lead reads the error
                row["errors"][forward] = error_text(exc)
                continue
            row["compile_s"][forward] = round(time.perf_counter() - t0, 2)
            contract = compiled.contract
            row["estimator"] = f"{contract.spec.estimator} m={contract.spec.m}"
            row["sites"] = [s.name for s in contract.state]
            row["notes"][forward] = [n for n in getattr(compiled, "notes", []) if "--forward exact" in n]
            row.setdefault("train_ops", {})[forward] = _ops(compiled.train)
            step = stepper(compiled, x, y)
            try:
                step()   # a graph onnxruntime cannot load or run is an error of the column, not of the run
            except Exception as exc:
                row["errors"][forward] = "run: " + error_text(exc)
                continue
            fns[(part, forward)] = step
    # calls per block: about 0.3 s of the slowest column, at least 1
    first = {}
    for key, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[key] = time.perf_counter() - t0
    calls = max(1, min(20, int(0.3 / max(first.values()))))
    us = timed(fns, repeats, calls, warmup=2)
    out = []
    for part, row in rows.items():
        forward_ms = us["forward"] / 1e3
        row["ms"] = {"forward": round(forward_ms, 3)}
        for forward in ("qdq", "exact"):
            if (part, forward) in us:
                row["ms"][f"step {forward}"] = round(us[(part, forward)] / 1e3, 3)
        ms = row["ms"]
        if "step qdq" in ms and "step exact" in ms:
            row["exact_over_qdq"] = round(ms["step exact"] / ms["step qdq"], 2)
        for forward in ("qdq", "exact"):
            if f"step {forward}" in ms:
                row[f"{forward}_over_forward"] = round(ms[f"step {forward}"] / forward_ms, 2)
        row["calls_per_block"], row["repeats"] = calls, repeats
        out.append(row)
    return out


def _ops(model) -> dict:
    """Counts of the ops that show what runs: the fused-able QDQ form against the exact rewrite's."""
    counts = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QuantizeLinear",
                            "DequantizeLinear", "Loop"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def table(rows: list[dict]) -> str:
    head = ("| model | trained | estimator | forward ms | step qdq ms | step exact ms | exact/qdq | "
            "qdq step/fwd | exact step/fwd |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ms = r["ms"]

        def cell(forward):
            if forward in r["errors"]:
                return "error: " + r["errors"][forward].replace("|", "\\|")
            return f"{ms[f'step {forward}']:.2f}"
        lines.append(f"| {r['model']} | {r['trained']} | {r.get('estimator', '')} | {ms['forward']:.2f} | "
                     f"{cell('qdq')} | {cell('exact')} | {r.get('exact_over_qdq', '—')} | "
                     f"{r.get('qdq_over_forward', '—')} | {r.get('exact_over_forward', '—')} |")
    return "\n".join(lines)


@click.command()
@click.option("--quick", is_flag=True, help="The shipped models and dscnn only.")
@click.option("--repeats", default=9, show_default=True, help="Timed blocks per column (median).")
@click.option("--out", default=str(HERE / "results" / "exact-forward"), show_default=True,
              help="Writes OUT.json and OUT.md.")
def main(quick, repeats, out):
    models = SHIPPED | {k: v for k, v in BENCH_MODELS.items() if not quick or k == "dscnn"}
    rows = []
    for name, (path, npz) in models.items():
        if not path.exists():
            print(f"{name}: {path} missing (models/recipes/build_bench.py builds it); skipped", flush=True)
            continue
        t0 = time.perf_counter()
        done = run_model(name, path, npz, repeats)
        rows += done
        print("\n".join(table(done).splitlines()[2:]), f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    md = table(rows)
    print("\n" + md)
    setup = (f"Batch {BATCH}, 1 intra-op thread, onnxruntime ORT_ENABLE_ALL; ms per call, columns of a model "
             f"interleaved round-robin, median of {repeats} blocks. No calibration data, so no whitening. "
             "Shipped models on their target-train data; bench models on N(0,1) inputs and random labels.")
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "setup": setup, "rows": rows},
                                                   indent=1) + "\n")
    out.with_suffix(".md").write_text(f"# --forward exact against --forward qdq\n\n{setup}\n\n{md}\n")


if __name__ == "__main__":
    main()
