"""Deep training on architecture-faithful models: step cost against its floor and one forward, and peak
memory against inference and torch fp32 backprop of the same tensors.

    python models/recipes/build_bench.py        # once: ResNet-18, MobileNetV2, DS-CNN, ViT-tiny (+ ResNet-50)
    python benchmarks/deep.py                   # writes benchmarks/results/deep.{json,md}
    python benchmarks/deep.py --branches cloned --out benchmarks/results/deep-cloned   # the fallback form
    python benchmarks/deep.py --source w16a8 --out benchmarks/results/deep-w16a8   # floor at 16-bit weights
    python benchmarks/deep.py --requant both --out benchmarks/results/deep-requant  # requant_bypass on and off

Per model (--source w8a8, or w16a8 where 16-bit weights are deployed) and trained depth (last 1 / last 2 /
the last block / one mid-network site), m and batch:
    step      one training step (onnxruntime session of train.onnx, state fed back)
    floor     t(prefix) + n · t(suffix): the model split at the trained tensors, each part its own call; n the
              estimator's suffix forwards: 2m (weight perturbation), 2m + 2 (node: the branches, the clean
              copy and the ĝ products), 1 (head)
              Its kernels are the source's: from w8a8 the suffix runs int8 QLinearConv, while a step trains
              16-bit weights, which onnxruntime's CPU provider runs as float Conv (it has no int16 kernel);
              from w16a8 the floor runs the same kernels as the step.
    forward   one forward of the inference model on the same batch
    memory    VmHWM of fresh processes (benchmarks/memory.py): inference, training, torch backprop
    kept      with --requant both: the same step compiled with --keep-requant (requant_bypass off: the
              branches keep the activation Q→DQ pairs after the suffix's last weighted op), timed in the
              same interleaved blocks as `step`; --requant keep times only that graph
    stacked, cloned, loop   with --also FORM: the same spec in that branch form, timed the same way
Timings interleave the candidates and take the median of repeated blocks, one thread each. The grid is
cut to what 2 shared cores finish (--quick cuts more); the rows say what ran.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import tempfile
import time

import click
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "models" / "recipes"))

import accuracy  # noqa: E402
import memory  # noqa: E402
from build_bench import CACHE  # noqa: E402
from fgcompile import modelio  # noqa: E402
from fgcompile.compiler import compile_model, write_compiled  # noqa: E402
from fgcompile.inspection import inspect_model  # noqa: E402
from fgcompile.session import make_session  # noqa: E402
from fgcompile.spec import TrainSpec  # noqa: E402
from run import machine  # noqa: E402
from split import split  # noqa: E402
from step_cost import step_feeds, timed  # noqa: E402

MODELS = ("dscnn", "mobilenetv2", "resnet18", "vit")
BLOCK = {"resnet18": 3, "mobilenetv2": 5, "dscnn": 3, "vit": 7}   # weight sites of the last block + head


def depths(name: str, source) -> dict:
    weights = [r for r in inspect_model(source) if r.role == "weight" and r.op in ("Conv", "MatMul", "Gemm")]
    mid = weights[len(weights) // 2]
    return {"last 1": {"last": 1}, "last 2": {"last": 2}, "last block": {"last": BLOCK[name]},
            f"mid {mid.op} ({mid.site})": {"train": (f"^{mid.tensor}$",)}}


def data(source, batch: int):
    shape = [d.dim_value for d in source.graph.input[0].type.tensor_type.shape.dim[1:]]
    classes = source.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, *shape)).astype(np.float32), rng.integers(0, classes, batch).astype(np.int64)


def cost(source, compiled, x, y, repeats: int, others=None) -> dict:
    """Step, floor and forward in ms; with `others` ({column: compiled}, e.g. `kept`: the same spec with
    requant_bypass off, `cloned`: in another branch form) also their steps, interleaved with the others so
    that every step shares the machine's load."""
    contract = compiled.contract
    name = contract.inputs.data
    infer, train = make_session(source, 1), make_session(compiled.train, 1, training=True)
    prefix_model, suffix_model, boundary = split(source, [s.name for s in contract.state])
    prefix, suffix = make_session(prefix_model, 1), make_session(suffix_model, 1)
    mid = dict(zip(boundary, prefix.run(boundary, {name: x})))
    outputs = [o.name for o in train.get_outputs()]
    feeds = step_feeds(contract, x, y, 1, compiled.state)
    t0 = time.perf_counter()
    train.run(outputs, feeds)
    calls = max(1, min(20, int(0.2 / (time.perf_counter() - t0))))   # blocks of >= ~0.2 s of steps
    fns = {"forward": lambda: infer.run(None, {name: x}), "step": lambda: train.run(outputs, feeds),
           "prefix": lambda: prefix.run(boundary, {name: x}), "suffix": lambda: suffix.run(None, mid)}
    for key, other in (others or {}).items():
        session, other_feeds = make_session(other.train, 1, training=True), step_feeds(other.contract, x, y, 1, other.state)
        fns[key] = lambda session=session, other_feeds=other_feeds: session.run(outputs, other_feeds)
    t = timed(fns, repeats, calls, warmup=2)
    floor = t["prefix"] + suffix_forwards(contract.spec) * t["suffix"]
    return {"ms": {k: round(v / 1e3, 2) for k, v in (t | {"floor": floor}).items()},
            "step_over_floor": round(t["step"] / floor, 3), "step_over_forward": round(t["step"] / t["forward"], 3)} \
        | {f"{key}_over_step": round(t[key] / t["step"], 3) for key in (others or {})}


def suffix_forwards(spec) -> int:
    """The suffix forwards a step of this (resolved) estimator needs at least."""
    return {"node": 2 * spec.m + 2, "head": 1}.get(spec.estimator, 2 * spec.m)


def peak_memory(path, fp32_path, source, fp32, compiled, batch: int, work: pathlib.Path) -> dict:
    x, y = data(source, batch)
    npz = work / f"data{batch}.npz"
    np.savez(npz, x=x, y=y)
    folder = work / "compiled"
    write_compiled(compiled, folder)
    names = accuracy.fp32_names(source, fp32, [s.name for s in compiled.contract.state])
    res = {"inference": memory.measure("inference", model=str(path), data=str(npz), batch=batch),
           "training": memory.measure("training", compiled=str(folder), data=str(npz), batch=batch)}
    try:
        res["backprop"] = memory.measure("backprop", model=str(fp32_path), trained=names, data=str(npz), batch=batch)
    except RuntimeError as exc:
        res["backprop"] = {"error": str(exc).splitlines()[-1][:200]}
    return res


@click.command()
@click.option("--models", "names", default=",".join(MODELS), show_default=True)
@click.option("--ms", default="1,4,8", show_default=True)
@click.option("--batches", default="8,32", show_default=True)
@click.option("--memory-at", default="8:32", show_default=True, help="m:batch rows that also measure memory")
@click.option("--branches", default="auto", show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--bits", default=16, show_default=True, help="Training grid (TrainSpec.bits): 8 keeps int8 kernels.")
@click.option("--source", "quantization", type=click.Choice(["w8a8", "w16a8"]), default="w8a8", show_default=True,
              help="Which cached quantization to compile and to take the floor and forward from.")
@click.option("--requant", type=click.Choice(["bypass", "keep", "both"]), default="bypass", show_default=True,
              help="bypass: TrainSpec's default requant_bypass; keep: compile with --keep-requant; both: time "
                   "the --keep-requant step beside the default one (column `kept`).")
@click.option("--also", type=click.Choice(["stacked", "cloned", "loop"]), default=None,
              help="Time the same spec in this branch form beside the default one (column of that name).")
@click.option("--estimator", default="auto", show_default=True,
              help="TrainSpec.estimator (auto keeps weight perturbation when --ms gives m; node: perturbation "
                   "of the trained layers' outputs, whose floor is 2m + 2 suffix forwards).")
@click.option("--only-depth", default=None, help="Substring of the depth labels to run.")
@click.option("--out", default=str(HERE / "results" / "deep"), show_default=True)
def main(names, ms, batches, memory_at, branches, repeats, bits, quantization, requant, also, estimator, only_depth,
         out):
    ms, batches = [int(v) for v in ms.split(",")], [int(v) for v in batches.split(",")]
    mem_rows = {tuple(int(v) for v in r.split(":")) for r in memory_at.split(",") if r}
    rows = []
    for name in names.split(","):
        path, fp32_path = CACHE / name / f"{quantization}.onnx", CACHE / name / "fp32.onnx"
        if not path.exists():
            raise SystemExit(f"{path} is missing: run python models/recipes/build_bench.py first")
        source, fp32 = modelio.load_model(path), modelio.load_model(fp32_path)
        for label, options in depths(name, source).items():
            if only_depth and only_depth not in label:
                continue
            for m in ms:
                t0 = time.perf_counter()
                spec = TrainSpec(m=m, branches=branches, bits=bits, requant_bypass=requant != "keep",
                                 estimator=estimator, **options)
                compiled = compile_model(source, spec)
                seconds = time.perf_counter() - t0
                others = {"kept": compile_model(source, dataclasses.replace(spec, requant_bypass=False))} \
                    if requant == "both" else {}
                if also:
                    others[also] = compile_model(source, dataclasses.replace(spec, branches=also))
                for batch in batches:
                    row = {"model": name, "trained": label, "m": m, "batch": batch,
                           "estimator": compiled.contract.spec.estimator,
                           "branches": compiled.contract.branches, "compile_s": round(seconds, 2),
                           "params": sum(int(np.prod(s.shape)) for s in compiled.contract.state)}
                    row |= cost(source, compiled, *data(source, batch), repeats, others)
                    if (m, batch) in mem_rows:
                        with tempfile.TemporaryDirectory() as tmp:
                            row["memory"] = peak_memory(path, fp32_path, source, fp32, compiled, batch, pathlib.Path(tmp))
                    rows.append(row)
                    print(_line(row), flush=True)
    result = {"machine": machine(), "source": quantization, "branches": branches, "bits": bits, "estimator": estimator,
              "requant": requant, "also": also, "rows": rows}
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(report(result))
    print(f"wrote {out}.json and {out}.md")


def _mem(row, key):
    mem = row.get("memory", {}).get(key, {})
    return mem.get("peak_mb")


def _line(r) -> str:
    ms = r["ms"]
    text = (f"{r['model']:12s} {r['trained']:28s} m={r['m']:<2d} B={r['batch']:<3d} {r['branches']:7s} "
            f"step {ms['step']:9.2f} ms  floor {ms['floor']:9.2f}  fwd {ms['forward']:8.2f}  "
            f"step/floor {r['step_over_floor']:.2f}  step/fwd {r['step_over_forward']:.2f}")
    if "kept" in ms:
        text += f"  kept-requant step {ms['kept']:9.2f} ms ({r['kept_over_step']:.2f}x)"
    for form in ("stacked", "cloned", "loop"):
        if form in ms:
            text += f"  {form} step {ms[form]:9.2f} ms ({r[form + '_over_step']:.2f}x step, {ms[form] / ms['floor']:.2f}x floor)"
    if "memory" in r:
        i, t, b = _mem(r, "inference"), _mem(r, "training"), _mem(r, "backprop")
        text += f"  peak MB infer {i} train {t} ({t / i:.2f}x) backprop {b}" + (f" ({b / t:.2f}x train)" if b else "")
    return text


def report(result) -> str:
    m = result["machine"]
    both, also = result.get("requant") == "both", result.get("also")
    head = [f"# Deep training cost and memory (`benchmarks/deep.py`, source {result.get('source', 'w8a8')}, "
            f"branches={result['branches']}, estimator={result.get('estimator', 'auto')}, "
            f"requant={result.get('requant', 'bypass')})", "",
            f"{m['cpu']}, {m['cores']} cores, onnxruntime {m['packages']['onnxruntime']}, torch "
            f"{m['packages']['torch']}, commit {m['commit']}, {m.get('date', '')}; one thread per session.", "",
            "| model | trained | params | m | batch | form | step ms | floor ms | forward ms | step/floor | step/forward "
            + ("| --keep-requant step ms | kept/step " if both else "")
            + (f"| {also} step ms | {also}/step | {also}/floor " if also else "")
            + "| peak MB infer / train / backprop | train/infer | backprop/train |",
            "|---" * (14 + 2 * both + 3 * bool(also)) + "|"]
    for r in result["rows"]:
        ms = r["ms"]
        i, t, b = _mem(r, "inference"), _mem(r, "training"), _mem(r, "backprop")
        mem = f"{i} / {t} / {b if b else '-'}" if t else ""
        head.append(f"| {r['model']} | {r['trained']} | {r['params']} | {r['m']} | {r['batch']} | {r['branches']} | "
                    f"{ms['step']:.1f} | {ms['floor']:.1f} | {ms['forward']:.1f} | {r['step_over_floor']:.2f} | "
                    f"{r['step_over_forward']:.2f} | "
                    + (f"{ms['kept']:.1f} | {r['kept_over_step']:.2f} | " if both else "")
                    + (f"{ms[also]:.1f} | {r[also + '_over_step']:.2f} | {ms[also] / ms['floor']:.2f} | " if also else "")
                    + f"{mem} | {f'{t / i:.2f}' if t else ''} | "
                    f"{f'{b / t:.2f}' if t and b else ''} |")
    return "\n".join(head) + "\n"


if __name__ == "__main__":
    main()
