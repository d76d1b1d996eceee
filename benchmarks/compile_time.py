"""Compile time on a large graph (#13: <= 5 s for a ResNet-50-size graph at 224x224), beside a baseline.

    python models/recipes/build_bench.py      # caches resnet50 (and the others) in ~/.cache/fgcompile-bench
    python benchmarks/compile_time.py         # --model resnet50 --m 8,32 --repeats 3

For each trained depth (last 1, last 2, one mid-network conv) it prints the best and median wall time of
`compile_model` and, as the baseline, what any tool that validates the same model pays: onnx.checker
(full) plus one onnxruntime session of the source. Writes benchmarks/results/compile_time.md.
"""
from __future__ import annotations

import os
import pathlib
import platform
import statistics
import sys
import time

import click
import onnx

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from deep import CACHE  # noqa: E402
from fgcompile import modelio  # noqa: E402
from fgcompile.compiler import compile_model  # noqa: E402
from fgcompile.inspection import inspect_model  # noqa: E402
from fgcompile.session import make_session  # noqa: E402
from fgcompile.spec import TrainSpec  # noqa: E402
from run import machine  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return min(seconds), statistics.median(seconds)


def depths(source) -> dict:
    convs = [r for r in inspect_model(source) if r.role == "weight" and r.op == "Conv"]
    mid = convs[len(convs) // 2]
    return {"last 1": {"last": 1}, "last 2": {"last": 2}, f"mid Conv ({mid.site})": {"train": (f"^{mid.tensor}$",)}}


def validate(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    make_session(model, 1)


@click.command()
@click.option("--model", "name", default="resnet50", show_default=True, help="A model cached by build_bench.py.")
@click.option("--m", "ms", default="8,32", show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--out", default=str(HERE / "results" / "compile_time.md"), show_default=True)
def main(name, ms, repeats, out):
    path = CACHE / name / "w8a8.onnx"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run python models/recipes/build_bench.py first")
    source = modelio.load_model(path)
    shape = "x".join(str(d.dim_value or d.dim_param) for d in source.graph.input[0].type.tensor_type.shape.dim)
    base = timed(lambda: validate(source), repeats)
    rows = [("baseline: onnx.checker (full) + one onnxruntime session of the source", "", "", *base)]
    for label, options in depths(source).items():
        for m in (int(v) for v in ms.split(",")):
            compiled = []
            best, median = timed(lambda: compiled.append(compile_model(source, TrainSpec(m=m, **options))), repeats)
            rows.append((f"compile {label}", m, compiled[-1].contract.branches, best, median))
            print(f"{rows[-1][0]:40s} m={m:<3d} {best:.2f} s best, {median:.2f} s median "
                  f"({median / base[1]:.1f}x the baseline)", file=sys.stderr)
    info = machine()
    lines = [f"# Compile time: {name} w8a8 ({len(source.graph.node)} nodes, input {shape})", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, {platform.platform()}; fgcompile at {info['commit']}; "
             f"{info['date']}; load average at start {os.getloadavg()[0]:.2f}. {repeats} repeats.", "",
             "| what | m | branches | best s | median s | median / baseline |", "|---|---|---|---|---|---|"]
    lines += [f"| {what} | {m} | {forms} | {best:.2f} | {median:.2f} | {median / base[1]:.1f} |"
              for what, m, forms, best, median in rows]
    text = "\n".join(lines) + "\n"
    modelio.write_bytes(pathlib.Path(out), text.encode())
    print(text)


if __name__ == "__main__":
    main()
