"""Keyword spotting (kws_dscnn, w8a8): target-microphone test accuracy after QZO-FF training of the last
layer, the last block and all layers, and of the last layer with the #15 defaults and each of the paper's
four enhancements on top of them, against fp32 backprop (Adam) of the same tensors.

    pip install -e '.[bench]'
    python benchmarks/kws.py                                   # every row, one after the other
    python benchmarks/kws.py --rows "last layer" --out A.json  # one row (run rows in parallel) ...
    python benchmarks/kws.py --merge A.json B.json             # ... then merge them into results/kws.*
    python benchmarks/kws.py --rows "last layer m=32 H=4" --rows "last layer m=32 H=4 --kernel-norm"
                                                               # rows run now replace theirs in results/kws.*

The protocol is benchmarks/accuracy.py's (same examples in the same order for both methods; lr chosen by
validation accuracy on 100 held-out target-train clips, then trained on all 1000 and scored once on the
1280 target-test clips; 3 seeds), with two savings, because deeper steps cost up to ~50x a last-layer
step: 30 epochs (10 for all layers, whose step takes ~1 s on the shared machine), and the learning
rate of the deeper rows chosen on seed 0 alone.
QZO-FF: the w8a8 model trained on the 16-bit grid (`--bits 16`) with the trained layer's input whitened
on the target-train inputs (accuracy.qzo_ff calibrates on the training split, never on test). The depth
rows: m = 8, headroom 1, ε = 64 LSBs (the setting before #15's defaults; their lr grid is in those LSBs).
The `m=32 H=4` rows: #15's first defaults (m = 32, headroom 4, so a 14-bit grid, ε = 16), alone and with each
enhancement (run.py's `enhancements`); the `defaults` row: m = 64 with the cosine schedule, the defaults
since; their lr chosen on seed 0 from the 14-bit rates around the default (one validation split, like the
other rows here);
the exported (deployed int8 grid) model's accuracy beside the trained one. Rows that train the same
tensors share one backprop row, reused from results/kws.json when its tensors, epochs and grid match.
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
from run import enhancements, machine  # noqa: E402

MODEL = "kws_dscnn"
OLD = {"m": 8, "headroom": 1}      # before #15's defaults
# row: (--last N, TrainSpec options, QZO-FF lr grid in LSBs of the training grid per unit of ĝ, seeds that
# choose the lr, epochs)
ROWS = {
    "last layer": (1, OLD, [64.0, 128.0, 256.0, 512.0], [0, 1, 2], 30),    # fc (Gemm 48->10)
    "last block": (3, OLD, [32.0, 128.0], [0], 30),                       # block3 dw + pw Conv, fc
    "all layers": (10, OLD, [16.0, 64.0], [0], 10),                       # stem, 4 blocks, fc: ~1 s a step
    **{f"last layer m=32 H=4{' ' + flag if flag else ''}": (1, {"m": 32, **options}, [2.0, 4.0, 8.0, 16.0, 32.0], [0], 30)
       for flag, options in [("", {}), *enhancements(16)]},
    # the defaults since #15's last measurements: m = 64 and the cosine schedule (its grid one rate higher)
    "last layer, the defaults (m=64 H=4 cosine)": (1, {"m": 64, "schedule": "cosine"},
                                                  [2.0, 4.0, 8.0, 16.0, 32.0, 64.0], [0], 30),
}
BACKPROP_LR = [1e-3, 3e-3, 1e-2]
SEEDS = [0, 1, 2]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def data(split: str):
    return load_data(models.path(models.manifest()["models"][MODEL]["splits"][split]))


def run_row(row: str, epochs: int | None, previous: list[dict], batch: int = 32) -> dict:
    """One row: QZO-FF, and fp32 backprop of the same tensors unless `previous` (rows of earlier runs,
    this one's included) holds it for the same tensors, epochs, lr grid and seeds."""
    import backprop  # torch: only the baseline needs it
    last, options, grid, select_seeds, row_epochs = ROWS[row]
    schedule = options.get("schedule", "constant")
    options = {k: v for k, v in options.items() if k != "schedule"}
    epochs = epochs or row_epochs
    entry = models.manifest()["models"][MODEL]["variants"]
    source = modelio.load_model(models.path(entry["w8a8"]["file"]))
    fp32 = modelio.load_model(models.path(entry["fp32"]["file"]))
    train, test = data("target_train"), data("target_test")
    spec = lambda lr, seed: TrainSpec(last=last, lr=lr, seed=seed, **options)
    trained = [s.name for s in compile_model(source, spec(None, 0)).contract.parameters()]
    names = accuracy.fp32_names(source, fp32, trained)
    mc = machine()
    res = {"last": last, "options": ROWS[row][1], "tensors": names, "parameters": int(sum(
        np.prod(i.dims) for i in fp32.graph.initializer if i.name in names)), "epochs": epochs,
        "commit": mc["commit"], "date": mc["date"]}

    def qzo(lr, seed, tr, te, ep, b):
        return accuracy.qzo_ff(source, spec(lr, seed), tr, te, ep, b, schedule)

    def bp(lr, seed, tr, te, ep, b):
        return backprop.accuracy(backprop.fine_tune(fp32, names, *tr, ep, b, lr, seed), *te)

    t0 = time.perf_counter()
    lr, val = accuracy.select(qzo, grid, select_seeds, train, epochs, batch)
    both = [accuracy.qzo_ff(source, spec(lr, s), train, test, epochs, batch, schedule, exported=True) for s in SEEDS]
    res["qzo_ff"] = {"lr": lr, "eps": compile_model(source, spec(lr, 0)).contract.spec.eps,
                     "validation": {str(k): round(v, 4) for k, v in val.items()}, "selection_seeds": select_seeds,
                     **accuracy.summary([t for t, _ in both]), "exported": accuracy.summary([e for _, e in both])}
    log(f"{row} qzo_ff: {res['qzo_ff']['mean']:.2%} exported {res['qzo_ff']['exported']['mean']:.2%} "
        f"(lr {lr}, {time.perf_counter() - t0:.0f} s)")
    same = next((p["backprop"] for p in previous if p["tensors"] == names and p["epochs"] == epochs), None)
    if same is not None:
        res["backprop"] = {**same, "reused": same.get("reused", True)}
        log(f"{row} backprop: {same['mean']:.2%} (reused)")
        return res
    t0 = time.perf_counter()
    lr, val = accuracy.select(bp, BACKPROP_LR, select_seeds, train, epochs, batch)
    final = [bp(lr, s, train, test, epochs, batch) for s in SEEDS]
    res["backprop"] = {"lr": lr, "validation": {str(k): round(v, 4) for k, v in val.items()},
                       "selection_seeds": select_seeds, **accuracy.summary(final)}
    log(f"{row} backprop: {np.mean(final):.2%} (lr {lr}, {time.perf_counter() - t0:.0f} s)")
    return res


def markdown(r: dict) -> str:
    mc = r["machine"]
    first = {}                   # commit -> date of its earliest row
    for x in sorted(r["rows"].values(), key=lambda x: x.get("date", mc["date"])):
        first.setdefault(x.get("commit", mc["commit"]), x.get("date", mc["date"]))
    rows = sorted(r["rows"].items(), key=lambda kv: list(ROWS).index(kv[0]) if kv[0] in ROWS else len(ROWS))
    lines = ["# Keyword spotting: QZO-FF against fp32 backprop (depth, #15 defaults, the paper's enhancements)", "",
             f"Machine: {mc['cpu']}, {mc['cores']} cores (shared with other jobs); "
             + ", ".join(f"{k} {v}" for k, v in mc["packages"].items() if v)
             + f"; fgcompile at {', '.join(f'{c} (from {d})' for c, d in first.items())} (a commit ending in + ran "
             "with the change that added its rows uncommitted on top). One thread each.", "",
             f"kws_dscnn w8a8, target-microphone test accuracy, % (mean ± std over seeds {SEEDS}). "
             f"Untrained: {100 * r['untrained']:.1f}. QZO-FF trains on the 16-bit grid (14 bits with headroom 4), "
             "whitened; lr chosen on validation (seeds in the lr column); exported: the deployed int8 model.", "",
             "| trained | parameters | epochs | QZO-FF | exported | fp32 backprop (Adam) | QZO-FF − backprop (exported) |",
             "|---|---|---|---|---|---|---|"]
    for row, x in rows:
        q, b = x["qzo_ff"], x["backprop"]
        ex = q.get("exported")
        seeds = q.get("selection_seeds", SEEDS)
        lines.append(f"| {row} (`--last {x['last']}`) | {x['parameters']} | {x['epochs']} | "
                     f"{100 * q['mean']:.1f} ± {100 * q['std']:.1f} (lr {q['lr']:g} on seed{'s' * (len(seeds) > 1)} "
                     f"{','.join(map(str, seeds))}) | "
                     + (f"{100 * ex['mean']:.1f} ± {100 * ex['std']:.1f}" if ex else "–") + " | "
                     f"{100 * b['mean']:.1f} ± {100 * b['std']:.1f} (lr {b['lr']:g}{', reused' if b.get('reused') else ''}) | "
                     f"{100 * (q['mean'] - b['mean']):+.1f}" + (f" ({100 * (ex['mean'] - b['mean']):+.1f})" if ex else "")
                     + " |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--rows", "rows", multiple=True, type=click.Choice(list(ROWS)), help="Default: all rows.")
@click.option("--epochs", type=int, default=None, help="Budget of every row (default: the row's own).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write this run's rows here as JSON (default: into results/kws.{json,md}, replacing the "
                   "rows of the same name and keeping the others).")
@click.option("--merge", "merge", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Merge row files of earlier runs into results/kws.{json,md} instead of running.")
def main(rows, epochs, out, merge):
    committed = HERE / "results" / "kws.json"
    earlier = json.loads(committed.read_text()) if committed.exists() else {"rows": {}}
    if merge:
        parts = [json.loads(pathlib.Path(p).read_text()) for p in merge]
        result = {**parts[0], "rows": {k: v for p in parts for k, v in p["rows"].items()}}
    else:
        done = {}
        for row in rows or ROWS:
            done[row] = run_row(row, epochs, [*earlier["rows"].values(), *done.values()])
        result = {"machine": machine(), "model": MODEL,
                  "untrained": accuracy.untrained(modelio.load_model(models.path(
                      models.manifest()["models"][MODEL]["variants"]["w8a8"]["file"])), data("target_test")),
                  "rows": done if out else {**earlier["rows"], **done}}
    if out and not merge:
        modelio.save_json(pathlib.Path(out), result)
        return
    modelio.save_json(committed, result)
    text = markdown(result)
    modelio.write_bytes(HERE / "results" / "kws.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()
