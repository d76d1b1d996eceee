"""Where a training step's time goes with requant_bypass on (the default) and off (`--keep-requant`):
onnxruntime's own profile of the same steps, summed by kernel family. Shares within one profile
depend far less on the machine's load than wall-clock ratios between runs do, so this runs on a
shared machine; the step times themselves come from `benchmarks/deep.py --requant both` on an idle one.

    python models/recipes/build_bench.py          # once (the architecture-faithful models)
    python benchmarks/requant_split.py            # ViT block, DS-CNN block, ResNet-18 mid conv
    python benchmarks/requant_split.py --shipped  # digits_cnn --last 3 / 4 and digits_attn --last 7
"""
from __future__ import annotations

import collections
import json
import pathlib
import sys
import tempfile

import click
import numpy as np
import onnx
import onnxruntime as ort

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "models" / "recipes"))

from build_bench import CACHE  # noqa: E402
from deep import data, depths  # noqa: E402
from fgcompile import models, modelio  # noqa: E402
from fgcompile.compiler import compile_model  # noqa: E402
from fgcompile.spec import TrainSpec  # noqa: E402
from step_cost import step_feeds  # noqa: E402

INT8 = ("QLinear", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantize")
FLOAT = {"Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "NhwcFusedConv"}
FAMILIES = ("int8 kernels", "float Conv/MatMul/Gemm", "Quantize/DequantizeLinear", "other")
SHIPPED = {"digits_cnn": ("--last 3", "--last 4"), "digits_attn": ("--last 7",)}


def family(op: str) -> str:
    if op.startswith(INT8):
        return FAMILIES[0]
    if op in FLOAT:
        return FAMILIES[1]
    return FAMILIES[2] if op in ("QuantizeLinear", "DequantizeLinear") else FAMILIES[3]


def profile(graphs: dict, x, y, steps: int) -> dict:
    """Mean µs per step in each kernel family for each compiled graph (node events of onnxruntime's
    profile, one thread). The graphs' steps alternate, so that both see the same load."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for key, compiled in graphs.items():
            opts.enable_profiling, opts.profile_file_prefix = True, f"{tmp}/{key}"
            sess = ort.InferenceSession(compiled.train.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            runs[key] = sess, step_feeds(compiled.contract, x, y, 1, compiled.state)
        for _ in range(steps):
            for sess, feeds in runs.values():
                sess.run(None, feeds)
        events = {k: json.loads(pathlib.Path(sess.end_profiling()).read_text()) for k, (sess, _) in runs.items()}
    out = {}
    for key, evs in events.items():
        us = collections.Counter()
        for e in evs:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                us[family(e["args"]["op_name"])] += e["dur"] / steps
        out[key] = {f: round(us[f]) for f in FAMILIES}
    return out


def kernels(compiled) -> collections.Counter:
    """Nodes per kernel family in the graph onnxruntime runs (after its QDQ fusion): a count that does
    not depend on the load."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = f"{tmp}/optimized.onnx"
        ort.InferenceSession(compiled.train.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(f"{tmp}/optimized.onnx").graph
    return collections.Counter(family(n.op_type) for n in graph.node)


def cases(shipped: bool, names: list[str]):
    """(model, depth label, source, spec options, input batch) of every case to profile."""
    if shipped:
        d = np.load(models.path(models.manifest()["data"]["target_train"]))
        for name, labels in SHIPPED.items():
            source = modelio.load_model(models.path(models.manifest()["models"][name]["variants"]["w16a8"]["file"]))
            for label in labels:
                yield name, label, source, {"last": int(label.split()[1])}, (d["x"][:32], d["y"][:32])
        return
    for name in names:
        source = modelio.load_model(CACHE / name / "w8a8.onnx")
        for label, options in depths(name, source).items():
            if label != "last 1":
                yield name, label, source, options, data(source, 32)


@click.command()
@click.option("--models", "names", default="vit,dscnn,resnet18", show_default=True)
@click.option("--shipped", is_flag=True, help="Profile the shipped digits models at the depths of run.py's deep rows.")
@click.option("--m", default=8, show_default=True)
@click.option("--steps", default=20, show_default=True, help="Profiled steps per graph; 0: count kernels only.")
def main(names, shipped, m, steps):
    print("| model | trained | requant | step µs (profiled) | "
          + " | ".join(f"{f}: µs (share), nodes" for f in FAMILIES) + " |")
    print("|---" * (4 + len(FAMILIES)) + "|")
    for name, label, source, options, (x, y) in cases(shipped, names.split(",")):
        graphs = {way: compile_model(source, TrainSpec(m=m, requant_bypass=way == "bypass", **options))
                  for way in ("bypass", "kept")}
        same = graphs["bypass"].train.graph == graphs["kept"].train.graph   # the contract's spec differs
        timed = profile(graphs, x, y, steps) if steps else {}
        for way, compiled in graphs.items():
            us, count = timed.get(way), kernels(compiled)
            total = sum(us.values()) if us else None
            print(f"| {name} | {label} | {way}{' (same graph)' if same else ''} | {total or '–'} | "
                  + " | ".join((f"{us[f]} ({100 * us[f] / total:.0f}%), " if us else "") + str(count[f])
                               for f in FAMILIES) + " |", flush=True)

if __name__ == "__main__":
    main()
