"""Node perturbation against the default estimator on the shipped models (issue #25).

Per (model, depth, estimator): compile with the training data as whitening calibration, as `adapt` does (the
default estimator reparametrizes the weight; node preconditions its step, ΔW ∝ P²·ĝ; --no-whitening turns
both off), choose the rate with `tune` (5 folds, the run's epochs, on seed 0's compile), train each seed on
all of the target train split, export, and score the exported model on the target test split. One JSON line
per run on stdout (and appended to --out). --model is a shipped model's name (its target splits as `adapt`
picks them: benchmarks/adapt.py's files_of) or an .onnx path (then --data names the directory or the two
npz files). `--estimators bp` is fp32 Adam backprop of the same tensors (the fp32.onnx beside the
model; lr by 5-fold validation over 1e-3, 3e-3, 1e-2 on seed 0), scored as fp32. A depth node refuses (e.g. a Conv site) is one line with its SpecError.
`--train REGEX` (repeatable) trains the sites it matches (TrainSpec(train=(REGEX,))) instead of `--last N`,
one set of rows per pattern; each row records it as "train" and --table groups by it. `--higher-rates K` adds
K doublings above the top of tune's grid (the graph's fixed-point bound still drops what it cannot take), for
when tune chooses its largest rate; rows then record "higher_rates". `--rates LR ...` makes tune search exactly
these (cosine still adds twice the largest; the bound still applies); rows record "rates". `--lr LR` skips
tune and trains every seed at LR (rows record "lr_given"; for when tune would take too long).

    python benchmarks/node_estimator.py --epochs 30 --seeds 0 1 2 --last 2 1
    python benchmarks/node_estimator.py --epochs 30 --seeds 0 1 2 --last 3 4 --estimators node node-alternate sign
    python benchmarks/node_estimator.py --model digits_attn --last 3 7 1 --out /tmp/attn.jsonl
    python benchmarks/node_estimator.py --model kws_dscnn --last 1 3 --out /tmp/kws.jsonl
    python benchmarks/node_estimator.py --train conv2 --train fc1 --estimators node sign   # one mid layer each

node-alternate: --node-schedule alternate (direction i perturbs trained layer i mod L only).
head: --estimator head (the exact gradient at the logits; --last 1 only). auto: the default estimator and m
(passes/plan.py), as a user's compile gets them.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import onnx

import fgcompile
from fgcompile.errors import SpecError
from fgcompile.heads import head_of
from fgcompile.runtime.data import load_data
from fgcompile.session import SessionSettings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from adapt import files_of  # noqa: E402

ESTIMATORS = {"node": dict(estimator="node", m=8, node_schedule="all"), "node-alternate": dict(estimator="node", m=8, node_schedule="alternate"),
              "sign": dict(estimator="sign"), "head": dict(estimator="head"), "auto": dict(estimator="auto"),
              "bp": dict()}
BACKPROP_LR = [1e-3, 3e-3, 1e-2]   # Adam, as benchmarks/run.py's baseline
HIGHER_RATES = 0   # --higher-rates
RATES = None       # --rates
GIVEN_LR = None    # --lr
HEADROOM = None    # --headroom


def set_grid(k: int = 0, rates: list[float] | None = None) -> None:
    """tune's rate grid: exactly `rates`, else the estimator's with k doublings above its largest rate."""
    from fgcompile.runtime import tune as _tune
    base = _tune.lr_grid
    _tune.lr_grid = lambda bits, estimator="sign": tuple(rates) if rates else (
        (g := base(bits, estimator)) + tuple(g[-1] * 2.0 ** i for i in range(1, k + 1)))


def splits(model: str, data: str | None) -> tuple[str, str, str]:
    """(model path, target-train npz, target-test npz) of a shipped model's name or of an .onnx path."""
    if not model.endswith(".onnx"):
        f = files_of(model)
        named = lambda v: v if isinstance(v, tuple) else str(v)    # a detector's splits: (x, y) in memory
        return str(f["model"]), named(f["target_train"]), named(f["target_test"])
    if data is None:
        return model, "models/data/digits_target_train.npz", "models/data/digits_target_test.npz"
    train, _, test = data.partition(",")
    return model, train, test


def _data(split):
    """(x, y) of a split: a detector's relabelled arrays as given (demo.task_files), else its npz file (float32 x,
    also from integer codes with x_scale: the kws splits)."""
    return split if isinstance(split, tuple) else load_data(split)


def run(last: int, name: str, seeds: list[int], epochs: int, model: str, data: str | None = None,
        whiten: bool = True, out: str | None = None, train: str | None = None) -> None:
    """Rows of one (depth or --train pattern, estimator): train=REGEX trains the sites it matches, not `last`."""
    path, train_path, test = splits(model, data)
    sites = dict(train=(train,)) if train else dict(last=last)
    higher = {"higher_rates": HIGHER_RATES} if HIGHER_RATES else {"rates": RATES} if RATES else {}
    higher |= {"lr_given": True} if GIVEN_LR else {}
    higher |= {"headroom": HEADROOM} if HEADROOM else {}
    xy = _data(train_path)
    rate = GIVEN_LR

    def emit(row: dict) -> None:
        where = {"train": train} if train else {"last": last}
        line = json.dumps({"model": model, **where, "estimator": name, "spec": ESTIMATORS[name], **row})
        print(line, flush=True)
        if out:
            with open(out, "a") as f:
                f.write(line + "\n")

    if name == "bp":
        return backprop_rows(path, sites, xy, _data(test), seeds, epochs, emit)
    for seed in seeds:
        start = time.time()
        spec = fgcompile.TrainSpec(**sites, seed=seed, **ESTIMATORS[name], **({"headroom": HEADROOM} if HEADROOM else {}))
        try:
            compiled = fgcompile.compile_model(onnx.load(path), spec, calibration=xy[0] if whiten else None)
        except SpecError as exc:
            emit({"refused": str(exc)})
            return
        trainer = fgcompile.Trainer(compiled, session=SessionSettings(threads=1))
        tuned = None
        if rate is None:
            tuned = fgcompile.tune(trainer, xy, epochs=epochs, folds=5)
            rate = tuned["choice"]["lr"]
        trainer.fit(xy, epochs=epochs, lr=rate, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            fgcompile.export_model(trainer, f"{tmp}/adapted.onnx")
            acc = fgcompile.evaluate(f"{tmp}/adapted.onnx", test)
        emit({"seed": seed, "trained": [s.name for s in compiled.contract.state], **higher,
              "whitened": compiled.contract.spec.precondition == "whiten", "epochs": epochs, "lr": rate,
              "exported_accuracy": acc["accuracy"], **{k: acc[k] for k in ("auc", "miss_rate") if k in acc},
              "seconds": round(time.time() - start, 1),
              **({"tune": _scores(tuned)} if tuned else {})})


def backprop_rows(path: str, sites: dict, xy, test, seeds: list[int], epochs: int, emit) -> None:
    """fp32 Adam backprop of the same tensors (the fp32.onnx beside the model), lr by 5-fold validation on
    seed 0 (benchmarks/accuracy.select, run.py's grid), scored as the fp32 model on the target test split; a
    one-logit detector's by its logistic loss, lr by validation AUC (benchmarks/detect.py's grid), with AUC and
    miss rate."""
    import accuracy
    import backprop
    fp32_path = pathlib.Path(path).with_name("fp32.onnx")
    quantized, fp32 = onnx.load(path), onnx.load(fp32_path)
    state = [s.name for s in fgcompile.compile_model(quantized, fgcompile.TrainSpec(**sites)).contract.state]
    names = accuracy.fp32_names(quantized, fp32, state)

    if head_of(fp32).kind == "sigmoid":    # a one-logit detector: benchmarks/detect.py's protocol
        import detect
        start = time.time()
        r = detect.backprop_runs(fp32, names, xy, test, epochs, seeds)
        for seed, run in zip(seeds, r["runs"]):
            emit({"seed": seed, "trained": names, "optimizer": "adam", "epochs": epochs, "lr": r["lr"],
                  "fp32_accuracy": run["accuracy"], "auc": run["auc"], "miss_rate": run["miss_rate"],
                  "seconds": round(time.time() - start, 1),
                  **({"tune": r["validation_auc"]} if seed == seeds[0] else {})})
        return

    def bp(lr, seed, tr, te, ep, b):
        return backprop.accuracy(backprop.fine_tune(fp32, names, *tr, ep, b, lr, seed), *te)
    start = time.time()
    rate, val = accuracy.select(bp, BACKPROP_LR, seeds[:1], xy, epochs, 32, folds=5)
    for seed in seeds:
        emit({"seed": seed, "trained": names, "optimizer": "adam", "epochs": epochs, "lr": rate,
              "fp32_accuracy": bp(rate, seed, xy, test, epochs, 32),
              "seconds": round(time.time() - start, 1), **({"tune": val} if seed == seeds[0] else {})})
        start = time.time()


def _scores(tuned: dict) -> dict:
    """tune's mean validation accuracy per rate."""
    return {f"{r['lr']:g}": round(r["val_accuracy"], 4) for r in tuned["scores"]}


def table(lines: list[dict]) -> str:
    """A markdown table of JSON lines: per (model, depth, estimator) the rate, each seed's and the mean accuracy
    (exported int8 for fgcompile, fp32 for bp), or the refusal."""
    groups = {}
    for r in lines:
        where = f"--train {r['train']}" if "train" in r else f"--last {r['last']}"
        where += f" (grid +{r['higher_rates']} doublings)" if r.get("higher_rates") else \
            f" (rates {', '.join(f'{x:g}' for x in r['rates'])})" if r.get("rates") else \
            " (lr given, not tuned)" if r.get("lr_given") else ""
        where += f" (headroom {r['headroom']})" if r.get("headroom") else ""
        where += f" ({r['epochs']} epochs)" if r.get("epochs", 30) != 30 else ""
        groups.setdefault((r["model"], where, r["estimator"], r.get("spec", {}).get("m")), []).append(r)
    label = {"node": "node, m = {m}", "sign": "sign, m = 64", "head": "head (exact gradient)", "bp": "fp32 Adam backprop"}
    out = ["| model | trained | estimator | lr | seeds | per seed | mean ± std |", "|---|---|---|---|---|---|---|"]
    for (model, where, name, m), rs in groups.items():
        head = f"| {model} | `{where}` | {label.get(name, name).format(m=m)} | "
        if "refused" in rs[0]:
            out.append(head + f"– | – | refused: {rs[0]['refused'].split('. It supports')[0]} | – |")
            continue
        acc = [100 * r.get("exported_accuracy", r.get("fp32_accuracy")) for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        detector = f" (AUC {statistics.mean(r['auc'] for r in rs):.4f}, miss @ 5% FA " \
                   f"{100 * statistics.mean(r['miss_rate'] for r in rs):.1f}%)" if "auc" in rs[0] else ""
        out.append(head + f"{rs[0]['lr']:g} | {','.join(str(r['seed']) for r in rs)} | "
                   f"{' / '.join(f'{a:.1f}' for a in acc)} | {statistics.mean(acc):.1f} ± {sd:.1f}{detector} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--last", type=int, nargs="+", default=[2, 1])
    p.add_argument("--train", action="append", default=None, metavar="REGEX",
                   help="train the sites this regex matches instead of --last (repeatable: rows per pattern)")
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    p.add_argument("--model", default="models/digits_cnn/w8a8.onnx",
                   help="a shipped model's name (digits_cnn, digits_attn, kws_dscnn, kws_detect) or an .onnx path")
    p.add_argument("--data", default=None, help="with an .onnx --model: TRAIN.npz,TEST.npz (default: digits target)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--no-whitening", action="store_true")
    p.add_argument("--node-m", type=int, default=8, help="the node estimator's m (directions per step)")
    p.add_argument("--higher-rates", type=int, default=0, metavar="K",
                   help="add K doublings above the top of tune's rate grid")
    p.add_argument("--rates", type=float, nargs="+", default=None, metavar="LR",
                   help="tune searches exactly these rates (instead of the estimator's grid)")
    p.add_argument("--lr", type=float, default=None, help="skip tune: train every seed at this rate")
    p.add_argument("--lr-shift", type=int, default=None,
                   help="the rate's fixed point (TrainSpec.lr_shift, default 8): a lower shift lets rates reach 2047/2^shift")
    p.add_argument("--headroom", type=int, default=None, help="TrainSpec(headroom=H) for every compile (rows record it)")
    p.add_argument("--table", nargs="+", default=None, metavar="JSONL",
                   help="print the markdown table of these result files instead of running")
    a = p.parse_args()
    ESTIMATORS["node"]["m"] = ESTIMATORS["node-alternate"]["m"] = a.node_m
    if a.lr_shift is not None:
        for name, options in ESTIMATORS.items():
            options.update({"lr_shift": a.lr_shift} if name != "bp" else {})
    if a.higher_rates or a.rates:
        HIGHER_RATES, RATES = a.higher_rates, a.rates
        set_grid(a.higher_rates, a.rates)
    GIVEN_LR, HEADROOM = a.lr, a.headroom
    if a.table:
        print(table([json.loads(line) for f in a.table for line in open(f) if line.strip()]), end="")
        raise SystemExit(0)
    for last, train in [(1, t) for t in a.train] if a.train else [(n, None) for n in a.last]:
        for name in a.estimators:
            run(last, name, a.seeds, a.epochs, a.model, a.data, not a.no_whitening, a.out, train)
