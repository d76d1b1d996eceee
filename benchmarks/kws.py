"""Keyword spotting (kws_dscnn, w8a8): target-microphone test accuracy after QZO-FF training of the last
layer, the last block and all layers, against fp32 backprop (Adam) of the same tensors.

    pip install -e '.[bench]'
    python benchmarks/kws.py                                   # every row, one after the other
    python benchmarks/kws.py --rows "last layer" --out A.json  # one row (run rows in parallel) ...
    python benchmarks/kws.py --merge A.json B.json             # ... then merge them into results/kws.*

The protocol is benchmarks/accuracy.py's (same examples in the same order for both methods; lr chosen by
validation accuracy on 100 held-out target-train clips, then trained on all 1000 and scored once on the
1280 target-test clips; 3 seeds), with two savings, because deeper steps cost up to ~50x a last-layer
step: 30 epochs (10 for all layers, whose step takes ~1 s on the shared machine), and the learning
rate of the deeper rows chosen on seed 0 alone.
QZO-FF: the w8a8 model trained on the 16-bit grid (`--bits 16`), m = 8, headroom 1, ε = 64 LSBs (the
setting before #15's defaults; its lr grid is in those LSBs), with the trained layer's input whitened
on the target-train inputs (accuracy.qzo_ff calibrates on the training split, never on test).
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

import accuracy  # noqa: E402
from fgcompile import models, modelio  # noqa: E402
from fgcompile.compiler import compile_model  # noqa: E402
from fgcompile.runtime.data import load_data  # noqa: E402
from fgcompile.spec import TrainSpec  # noqa: E402

MODEL = "kws_dscnn"
# row: (--last N, QZO-FF lr grid in 16-bit LSBs per unit of ĝ, seeds that choose the lr, epochs)
ROWS = {
    "last layer": (1, [64.0, 128.0, 256.0, 512.0], [0, 1, 2], 30),    # fc (Gemm 48->10)
    "last block": (3, [32.0, 128.0], [0], 30),                       # block3 dw + pw Conv, fc
    "all layers": (10, [16.0, 64.0], [0], 10),                       # stem, 4 blocks, fc: ~1 s a step
}
BACKPROP_LR = [1e-3, 3e-3, 1e-2]
SEEDS = [0, 1, 2]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def data(split: str):
    return load_data(models.path(models.manifest()["models"][MODEL]["splits"][split]))


def run_row(row: str, epochs: int | None, batch: int = 32) -> dict:
    import backprop  # torch: only the baseline needs it
    last, grid, select_seeds, row_epochs = ROWS[row]
    epochs = epochs or row_epochs
    entry = models.manifest()["models"][MODEL]["variants"]
    source = modelio.load_model(models.path(entry["w8a8"]["file"]))
    fp32 = modelio.load_model(models.path(entry["fp32"]["file"]))
    train, test = data("target_train"), data("target_test")
    spec = lambda lr, seed: TrainSpec(last=last, m=8, lr=lr, seed=seed, headroom=1)  # the docstring's setting
    trained = [s.name for s in compile_model(source, spec(None, 0)).contract.parameters()]
    names = accuracy.fp32_names(source, fp32, trained)
    res = {"last": last, "tensors": names, "parameters": int(sum(
        np.prod(i.dims) for i in fp32.graph.initializer if i.name in names)), "epochs": epochs}

    def qzo(lr, seed, tr, te, ep, b):
        return accuracy.qzo_ff(source, spec(lr, seed), tr, te, ep, b)

    def bp(lr, seed, tr, te, ep, b):
        return backprop.accuracy(backprop.fine_tune(fp32, names, *tr, ep, b, lr, seed), *te)

    for method, run, lrs in (("qzo_ff", qzo, grid), ("backprop", bp, BACKPROP_LR)):
        t0 = time.perf_counter()
        lr, val = accuracy.select(run, lrs, select_seeds, train, epochs, batch)
        final = [run(lr, s, train, test, epochs, batch) for s in SEEDS]
        res[method] = {"lr": lr, "validation": {str(k): round(v, 4) for k, v in val.items()},
                       "selection_seeds": select_seeds, **accuracy.summary(final)}
        log(f"{row} {method}: {np.mean(final):.2%} (lr {lr}, {time.perf_counter() - t0:.0f} s)")
    return res


def markdown(r: dict) -> str:
    mc = r["machine"]
    lines = ["# Keyword spotting: QZO-FF depth against fp32 backprop", "",
             f"Machine: {mc['cpu']}, {mc['cores']} cores (shared with other jobs); "
             + ", ".join(f"{k} {v}" for k, v in mc["packages"].items() if v)
             + f"; fgcompile at {mc['commit']}; {mc['date']}. One thread each.", "",
             f"kws_dscnn w8a8, target-microphone test accuracy, % (mean ± std over seeds {SEEDS}). "
             f"Untrained: {100 * r['untrained']:.1f}.", "",
             "| trained | parameters | epochs | QZO-FF (m=8, 16-bit grid, headroom 1, whitened) | fp32 backprop (Adam) | QZO-FF − backprop |",
             "|---|---|---|---|---|---|"]
    for row, x in r["rows"].items():
        q, b = x["qzo_ff"], x["backprop"]
        lines.append(f"| {row} (`--last {x['last']}`) | {x['parameters']} | {x['epochs']} | "
                     f"{100 * q['mean']:.1f} ± {100 * q['std']:.1f} (lr {q['lr']:g}) | "
                     f"{100 * b['mean']:.1f} ± {100 * b['std']:.1f} (lr {b['lr']:g}) | "
                     f"{100 * (q['mean'] - b['mean']):+.1f} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--rows", "rows", multiple=True, type=click.Choice(list(ROWS)), help="Default: all rows.")
@click.option("--epochs", type=int, default=None, help="Budget of every row (default: the row's own).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write this run's rows here as JSON (default: results/kws.{json,md}).")
@click.option("--merge", "merge", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Merge row files of earlier runs into results/kws.{json,md} instead of running.")
def main(rows, epochs, out, merge):
    from run import machine
    if merge:
        parts = [json.loads(pathlib.Path(p).read_text()) for p in merge]
        result = {**parts[0], "rows": {k: v for p in parts for k, v in p["rows"].items()}}
    else:
        result = {"machine": machine(), "model": MODEL,
                  "untrained": accuracy.untrained(modelio.load_model(models.path(
                      models.manifest()["models"][MODEL]["variants"]["w8a8"]["file"])), data("target_test")),
                  "rows": {row: run_row(row, epochs) for row in (rows or ROWS)}}
    if out and not merge:
        modelio.save_json(pathlib.Path(out), result)
        return
    modelio.save_json(HERE / "results" / "kws.json", result)
    text = markdown(result)
    modelio.write_bytes(HERE / "results" / "kws.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()
