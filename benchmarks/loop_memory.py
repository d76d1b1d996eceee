"""Peak memory of the memory-bounded form (`--branches loop`, or `--branches stacked`) against inference, per
model and trained depth: VmHWM of fresh processes (benchmarks/memory.py), m=8, batch 32 unless told. Memory does not
depend on CPU load, so this runs on a busy machine; it times nothing.

    python benchmarks/loop_memory.py --label before     # on one commit
    python benchmarks/loop_memory.py --label after      # on another: both columns land side by side
Results accumulate per label in --out.json (rows keyed by model and depth); --out.md shows every label.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

import click
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "models" / "recipes"))

import memory  # noqa: E402
from build_bench import CACHE  # noqa: E402
from deep import data, depths  # noqa: E402
from fgcompile import modelio  # noqa: E402
from fgcompile.compiler import compile_model, write_compiled  # noqa: E402
from fgcompile.inspection import inspect_model  # noqa: E402
from fgcompile.spec import TrainSpec  # noqa: E402
from run import machine  # noqa: E402

ROWS = "mobilenetv2:last 2,mobilenetv2:last block,resnet18:last 2,resnet18:last block,vit:last block,dscnn:last block"


@click.command()
@click.option("--rows", default=ROWS, show_default=True, help="model:depth label (benchmarks/deep.py's labels; "
              "'mid' matches the mid-network site).")
@click.option("--m", default=8, show_default=True)
@click.option("--batch", default=32, show_default=True)
@click.option("--bits", default=16, show_default=True)
@click.option("--iterations", default=3, show_default=True, help="Steps per process (the peak is reached in the first).")
@click.option("--branches", type=click.Choice(["loop", "stacked", "cloned"]), default="loop", show_default=True,
              help="The branch form to measure (inspect's estimate for that form beside it).")
@click.option("--label", default="after", show_default=True, help="Column name for this run (e.g. the commit).")
@click.option("--out", default=str(HERE / "results" / "deep-loop"), show_default=True)
def main(rows, m, batch, bits, iterations, branches, label, out):
    out = pathlib.Path(out)
    result = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {"runs": {}}
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    run = result["runs"].setdefault(label, {"rows": {}})      # a second run under a label adds rows
    run.update({"machine": machine(), "commit": commit, "m": m, "batch": batch, "bits": bits, "branches": branches,
                "command": "python benchmarks/loop_memory.py " +
                " ".join(repr(a) if " " in a else a for a in sys.argv[1:])})
    for row in rows.split(","):
        name, depth = row.split(":")
        path = CACHE / name / "w8a8.onnx"
        if not path.exists():
            raise SystemExit(f"{path} is missing: run python models/recipes/build_bench.py first")
        source = modelio.load_model(path)
        label_, options = next((k, v) for k, v in depths(name, source).items() if k.startswith(depth))
        compiled = compile_model(source, TrainSpec(m=m, branches=branches, bits=bits, **options))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = pathlib.Path(tmp)
            x, y = data(source, batch)
            np.savez(tmp / "data.npz", x=x, y=y)
            write_compiled(compiled, tmp / "compiled")
            infer = memory.measure("inference", model=str(path), data=str(tmp / "data.npz"), batch=batch,
                                   iterations=iterations)
            train = memory.measure("training", compiled=str(tmp / "compiled"), data=str(tmp / "data.npz"),
                                   batch=batch, iterations=iterations)
        trained = {s.name for s in compiled.contract.state}
        estimate = sum(r.loop_bytes if branches == "loop" else r.train_bytes
                       for r in inspect_model(source, m=m, bits=bits) if r.tensor in trained) / 2 ** 20
        run["rows"][f"{name} {label_}"] = {"inference_mb": infer["peak_mb"], "training_mb": train["peak_mb"],
                                           "ratio": round(train["peak_mb"] / infer["peak_mb"], 2),
                                           "estimate_mb": round(estimate, 1)}
        print(f"{name:12s} {label_:36s} infer {infer['peak_mb']:7.1f} MB  {branches} {train['peak_mb']:7.1f} MB  "
              f"{train['peak_mb'] / infer['peak_mb']:.2f}x  (inspect: +{estimate:.1f} MB)", flush=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(report(result))
    print(f"wrote {out}.json and {out}.md")


def report(result) -> str:
    runs = result["runs"]
    keys = list(dict.fromkeys(k for r in runs.values() for k in r["rows"]))
    lines = ["# Peak memory per branch form (`benchmarks/loop_memory.py`)", "",
             "VmHWM of fresh processes (one onnxruntime session, one thread): inference of the w8a8 model vs "
             "training steps of train.onnx compiled with each run's `--branches` (loop unless its line says "
             "otherwise). Target (#13): the loop form <= 1.3x inference.", ""]
    for label, r in runs.items():
        mc = r["machine"]
        lines.append(f"- **{label}**: commit {r['commit']}, m={r['m']}, batch {r['batch']}, bits {r['bits']}, "
                     f"branches {r.get('branches', 'loop')}"
                     + (f" (`{r['command']}`)" if "command" in r else "") + "; "
                     f"{mc['cpu']}, {mc['cores']} cores (shared, loaded), {mc['platform']}, python {mc['python']}, "
                     + ", ".join(f"{k} {v}" for k, v in mc["packages"].items()) + f"; {mc['date']}")
    lines += ["", "`inspect`: the bytes of the trained tensors that inspect estimates above inference for that form (MiB; "
              "activations not included), beside what the last column with an estimate measured above inference.", "",
              "| model, trained | inference MB | " + " | ".join(f"{lb} MB (x inference)" for lb in runs) +
              " | inspect vs measured above inference |", "|---|---|" + "---|" * (len(runs) + 1)]
    for key in keys:
        infer = next(r["rows"][key]["inference_mb"] for r in runs.values() if key in r["rows"])
        cells = [f"{r['rows'][key]['training_mb']:.1f} ({r['rows'][key]['ratio']:.2f}x)" if key in r["rows"] else "-"
                 for r in runs.values()]
        row = next((r["rows"][key] for r in reversed(list(runs.values()))
                    if "estimate_mb" in r["rows"].get(key, {})), {})
        bound = f"{row['estimate_mb']:.1f} vs {row['training_mb'] - row['inference_mb']:.1f}" if "estimate_mb" in row \
            else "-"
        lines.append(f"| {key} | {infer:.1f} | " + " | ".join(cells) + f" | {bound} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
