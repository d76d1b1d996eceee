"""Run every benchmark on every shipped model and write the results.

    pip install -e '.[bench]'          # adds torch 2.13.0 (CPU) for the backprop baseline
    python benchmarks/run.py           # about 10 minutes on 2 cores; --quick: about 1 minute

Writes benchmarks/results/latest.{json,md,png} (or --out DIR): accuracy (QZO-FF w8a8/w16a8 at
m = 1, 4, 8, 16 vs fp32 backprop vs untrained), step cost (vs one forward, vs the 2m-forward floor) and
peak memory (training vs inference vs backprop processes), with the machine they ran on.
"""
from __future__ import annotations

import datetime
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time

import click
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import accuracy  # noqa: E402
import branch_forms  # noqa: E402
import memory  # noqa: E402
import report  # noqa: E402
import step_cost  # noqa: E402
from fgcompile import __version__, models, modelio  # noqa: E402
from fgcompile.compiler import compile_model, write_compiled  # noqa: E402
from fgcompile.spec import LR_GRIDS, TrainSpec  # noqa: E402

VARIANTS = {"w8a8": 8, "w16a8": 16}          # variant -> training grid bits (8: the int8 grid as shipped)
MS = (1, 4, 8, 16)                         # the issue asks for 1, 4, 8; 16 shows the trend
QZO_LR = {bits: list(LR_GRIDS[bits]) for bits in (16, 8)}   # weight LSBs per unit of ĝ (`fgcompile tune`'s grids)
BACKPROP_LR = [1e-3, 3e-3, 1e-2]                                  # Adam
# (label, variant, grid bits, m, options: TrainSpec fields, and "schedule" for the Trainer); the extra
# rows measure requant_bypass by turning it off (--keep-requant) and the cosine lr schedule (whose mean
# rate is half the peak, so its grid reaches one step higher)
# headroom 1 and no preconditioning reproduce the rows before them (#15); the next rows measure headroom
# and whitening (--precondition whiten, calibrated on the training split) apart and together, and the last
# ones the paper's four enhancements, each on top of the #15 defaults (m=32, headroom 4, whitened)
OLD = {"headroom": 1, "precondition": "none"}


def enhancements(bits: int) -> list[tuple[str, dict]]:
    """(CLI flags, TrainSpec options) of the paper's four enhancements as the benchmarks run them
    (kws.py too); sharpness-aware takes ρ = ε of the #15 defaults' grid (1 LSB on the int8 grid)."""
    rho = 1 if bits == 8 else 16
    return [("--kernel-norm", {"kernel_norm": True}),
            ("--sparsity 0.9", {"sparsity": 0.9}),
            ("--sparsity 0.9 --sparse-mode random", {"sparsity": 0.9, "sparse_mode": "random"}),
            ("--sparsity 0.5 --sparse-mode threshold", {"sparsity": 0.5, "sparse_mode": "threshold"}),
            ("--momentum 0.25", {"momentum": 0.25}),
            (f"--sharpness {rho}", {"sharpness": rho})]


# deeper than the last layer (#13), with and without requant_bypass: the CNN's conv2 (--last 3) and both
# convs (--last 4), the transformer's block and head (--last 7: q, k, v, o, mlp1, mlp2, head; `fgcompile
# inspect`); a deep step costs 5-10x a last-layer one, so their lr grid is cut to four rates at 14 bits:
# validation chose 4, the smallest, from 4-32 on all three depths (more weights move per step than in the
# last layer, whose rate was 8-32)
DEEP = {"digits_cnn": (3, 4), "digits_attn": (7,)}
DEEP_LR = [1.0, 2.0, 4.0, 8.0]
RUN_KEYS = ("schedule", "models", "lrs")   # row options for the run, not TrainSpec fields
QZO_CONFIGS = [(f"{v} m={m} H=1", v, bits, m, OLD) for v, bits in VARIANTS.items() for m in MS] + \
    [("w16a8 m=4 H=1 --keep-requant", "w16a8", 16, 4, {"requant_bypass": False, **OLD})] + \
    [(f"{v} m=8 H=1 --schedule cosine", v, bits, 8, {"schedule": "cosine", **OLD}) for v, bits in VARIANTS.items()] + \
    [(f"{v} m={m} H={h}{' whiten' if w else ''}", v, bits, m, {"headroom": h, "precondition": "whiten" if w else "none"})
     for v, bits in VARIANTS.items() for m in (8, 32, 64) for h in (1, 4) for w in (False, True) if h > 1 or w] + \
    [(f"{v} m=32 H=4 whiten {flag}", v, bits, 32, {"headroom": 4, "precondition": "whiten", **options})
     for v, bits in VARIANTS.items() for flag, options in enhancements(bits)] + \
    [(f"{v} m={m} H=4 whiten --schedule cosine", v, bits, m, {"headroom": 4, "precondition": "whiten", "schedule": "cosine"})
     for v, bits in VARIANTS.items() for m in (32, 64)] + \
    [(f"w16a8 m=32 H=4 whiten --last {last}{flag}", "w16a8", 16, 32,
      {"last": last, "requant_bypass": not flag, "models": (name,), "lrs": DEEP_LR})
     for name, lasts in DEEP.items() for last in lasts for flag in ("", " --keep-requant")]


def lr_grid(bits: int, options: dict) -> list[float]:
    if "lrs" in options:
        return list(options["lrs"])
    resolution = 8 if bits == 8 else 16 - int(np.log2(options.get("headroom", 1)))
    grid = list(LR_GRIDS[resolution])      # in LSBs of the training grid, as `fgcompile tune` searches
    return grid + ([2 * grid[-1]] if options.get("schedule") == "cosine" else [])


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    versions = {}
    for pkg in ("onnxruntime", "onnx", "numpy", "torch"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except ImportError:
            versions[pkg] = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "fgcompile": __version__, "packages": versions,
            "commit": commit.stdout.strip() or None,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(split: str):
    d = np.load(models.path(models.manifest()["data"][split]))
    return d["x"], d["y"]


def run_accuracy(name: str, budgets: list[int], seeds: list[int], batch: int, quick: bool,
                 reused_backprop: dict | None = None, rows: str | None = None, folds: int = 1) -> dict:
    """QZO-FF rows and, per trained depth among them, fp32 backprop of the same tensors: `backprop`
    for the last layer, `backprop_deep[N]` for `--last N` rows (their gaps are against that one)."""
    entry = models.manifest()["models"][name]["variants"]
    train, test = load("target_train"), load("target_test")
    fp32 = modelio.load_model(models.path(entry["fp32"]["file"]))
    out = {"untrained": {v: accuracy.untrained(modelio.load_model(models.path(entry[v]["file"])), test)
                         for v in ["fp32", *VARIANTS]}, "budgets": {}}
    for epochs in budgets:
        res = {"examples": epochs * (len(train[1]) // batch) * batch, "qzo_ff": {}, "backprop": {}}
        depths = {}                      # --last N -> the fp32 names of the tensors its rows trained
        graphs = {}                      # (training graph, schedule, lr grid) -> the first row that ran it
        for label, variant, bits, m, extra in QZO_CONFIGS:
            if (rows and not re.search(rows, label)) or name not in extra.get("models", (name,)):
                continue
            source = modelio.load_model(models.path(entry[variant]["file"]))
            t0 = time.perf_counter()
            options = {k: v for k, v in extra.items() if k not in RUN_KEYS}
            schedule = extra.get("schedule", "constant")
            spec = lambda lr, seed: TrainSpec(m=m, bits=bits, lr=lr, seed=seed, **options)
            run = lambda lr, seed, tr, te, ep, b: accuracy.qzo_ff(source, spec(lr, seed), tr, te, ep, b, schedule)
            grid = [None] if quick else lr_grid(bits, extra)
            # a row whose options leave the training graph unchanged (--keep-requant where no requantization
            # follows the last weighted op) would repeat an earlier row's runs bit for bit: quote that row
            graph = compile_model(source, spec(None, 0), calibration=train[0]).train.graph.SerializeToString()
            twin = graphs.setdefault((graph, schedule, tuple(grid)), label)
            if twin != label:
                res["qzo_ff"][label] = {**res["qzo_ff"][twin], "options": extra, "same_graph_as": twin}
                log(f"  {name} {epochs} epochs QZO-FF {label}: the training graph of {twin!r}; its results")
                continue
            lr, val = (None, {}) if quick else accuracy.select(run, grid, seeds, train, epochs, batch, folds)
            both = [accuracy.qzo_ff(source, spec(lr, s), train, test, epochs, batch, schedule, exported=True)
                    for s in seeds]
            final, exported = [t for t, _ in both], [e for _, e in both]
            contract = compile_model(source, spec(lr, 0), calibration=train[0]).contract
            trained = [s.name for s in contract.parameters()]   # not the momentum buffers
            depths.setdefault(options.get("last", 1), accuracy.fp32_names(source, fp32, trained))
            res["qzo_ff"][label] = {"variant": variant, "m": m, "lr": lr or contract.spec.lr,
                                    "eps": contract.spec.eps, "options": extra, "branches": contract.branches,
                                    "validation": {str(k): round(v, 4) for k, v in val.items()},
                                    **accuracy.summary(final), "exported": accuracy.summary(exported)}
            log(f"  {name} {epochs} epochs QZO-FF {label}: {np.mean(final):.2%} exported {np.mean(exported):.2%} "
                f"(lr {lr}, {time.perf_counter() - t0:.0f} s)")
        previous = (reused_backprop or {}).get(str(epochs), [])
        for last, names in sorted(depths.items()):
            row = reused_row(previous, names, seeds, folds) \
                or _backprop(fp32, names, train, test, seeds, epochs, batch, quick, folds)
            log(f"  {name} {epochs} epochs backprop --last {last}: {row['mean']:.2%} (lr {row['lr']})"
                + (" (reused)" if row.get("reused") else ""))
            if last == 1:
                res["backprop"] = row
            else:
                res.setdefault("backprop_deep", {})[str(last)] = row
        out["budgets"][str(epochs)] = res
    return out


def reused_row(previous: list[dict], names: list[str], seeds: list[int], folds: int) -> dict | None:
    """The previous backprop row of the same tensors, seeds and validation folds, marked reused: a mean
    over other seeds, or a rate chosen on other folds, is not comparable with the QZO-FF rows of this run,
    so that row is computed afresh."""
    return next((dict(p, reused=True) for p in previous if p.get("tensors") == names and p.get("seeds") == seeds
                 and p.get("folds", 1) == folds), None)


def _backprop(fp32, names: list[str], train, test, seeds: list[int], epochs: int, batch: int, quick: bool,
              folds: int = 1) -> dict:
    import backprop  # torch: only this benchmark needs it

    def bp(lr, seed, tr, te, ep, b):
        return backprop.accuracy(backprop.fine_tune(fp32, names, *tr, ep, b, lr, seed), *te)
    lr, val = (3e-3, {}) if quick else accuracy.select(bp, BACKPROP_LR, seeds, train, epochs, batch, folds)
    final = [bp(lr, s, train, test, epochs, batch) for s in seeds]
    return {"tensors": names, "optimizer": "adam", "lr": lr, "seeds": list(seeds), "folds": folds,
            "validation": {str(k): round(v, 4) for k, v in val.items()}, **accuracy.summary(final)}


def run_cost(name: str, batches: list[int], quick: bool) -> list[dict]:
    entry = models.manifest()["models"][name]["variants"]
    x, y = load("target_train")
    rows = []
    timing = {"repeats": 3, "calls": 30} if quick else {"repeats": 7, "calls": 100}
    for variant, bits in VARIANTS.items():
        source = modelio.load_model(models.path(entry[variant]["file"]))
        for m in MS:
            for b in batches:
                r = step_cost.measure(source, TrainSpec(m=m, bits=bits), x[:b], y[:b], **timing)
                forms = branch_forms.measure(source, TrainSpec(m=m, bits=bits), x[:b], y[:b], **timing)
                rows.append({"variant": variant, **r, "branch_forms": forms})
                log(f"  {name} {variant} m={m} batch {b}: step {r['us']['step']:.0f} us, "
                    f"x{r['step_over_forward']:.2f} forward, x{r['step_over_floor']:.2f} floor; cloned "
                    f"branches x{forms['cloned_over_stacked']:.2f}")
    return rows


def run_memory(name: str, batches: list[int], m: int = 4) -> list[dict]:
    entry = models.manifest()["models"][name]["variants"]
    data = str(models.path(models.manifest()["data"]["target_train"]))
    fp32_path = models.path(entry["fp32"]["file"])
    fp32 = modelio.load_model(fp32_path)
    rows = []
    for variant, bits in VARIANTS.items():
        path = models.path(entry[variant]["file"])
        source = modelio.load_model(path)
        compiled = compile_model(source, TrainSpec(m=m, bits=bits))
        names = accuracy.fp32_names(source, fp32, [s.name for s in compiled.contract.state])
        with tempfile.TemporaryDirectory() as tmp:
            write_compiled(compiled, tmp)
            for b in batches:
                row = {"variant": variant, "m": m, "batch": b,
                       "inference": memory.measure("inference", model=str(path), data=data, batch=b),
                       "training": memory.measure("training", compiled=tmp, data=data, batch=b),
                       "trainer": memory.measure("trainer", compiled=tmp, data=data, batch=b),
                       "backprop": memory.measure("backprop", model=str(fp32_path),
                                                  trained=names, data=data, batch=b)}
                row["training_over_inference"] = round(row["training"]["peak_mb"] / row["inference"]["peak_mb"], 3)
                row["backprop_over_training"] = round(row["backprop"]["peak_mb"] / row["training"]["peak_mb"], 3)
                rows.append(row)
                log(f"  {name} {variant} batch {b}: peak MB inference {row['inference']['peak_mb']}, training "
                    f"{row['training']['peak_mb']}, backprop {row['backprop']['peak_mb']}")
    return rows


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default=str(HERE / "results"), show_default=True,
              help="Folder for latest.json, latest.md and latest.png.")
@click.option("--quick", is_flag=True, help="One seed, 30 epochs, default learning rates, short timings: a smoke run.")
@click.option("--only", type=click.Choice(["accuracy", "cost", "memory"]), multiple=True,
              help="Run only these benchmarks (repeatable). Default: all three.")
@click.option("--model", "model_names", multiple=True, help="Only these shipped models (default: all).")
@click.option("--reuse", type=click.Path(dir_okay=False, exists=True),
              help="A previous latest.json with the same settings: its fp32 backprop rows are reused (they do not "
                   "depend on fgcompile) and the benchmarks not run now are copied from it, marked as such.")
@click.option("--budgets", "--epochs", "budgets", type=int, multiple=True,
              help="Training budgets in epochs (default: 30 and 300; --quick: 30).")
@click.option("--rows", default=None, help="Only the QZO-FF accuracy rows whose label matches this regex.")
@click.option("--seeds", "seed_list", default=None, metavar="LIST",
              help="Comma-separated seeds of every accuracy row, QZO-FF and backprop alike (default: 0,1,2; "
                   "--quick: 0). Reused backprop rows are used only where they ran the same seeds.")
@click.option("--folds", type=click.IntRange(1, 5), default=1, show_default=True,
              help="Choose every row's learning rate by K-fold cross-validation on the 500 target-train examples "
                   "(fold i validates on the i-th 100 of one fixed permutation; fold 0 is the single split of "
                   "--folds 1), scored as the mean over every (fold, seed) pair.")
def main(out, quick, only, model_names, reuse, budgets, rows, seed_list, folds):
    try:
        import torch  # noqa: F401
    except ImportError:
        if not only or "accuracy" in only or "memory" in only:
            raise click.ClickException("the backprop baseline needs torch: pip install -e '.[bench]' "
                                       "(or run --only cost).")
    only = set(only or ("accuracy", "cost", "memory"))
    seeds = parse_seeds(seed_list) if seed_list is not None else ([0] if quick else [0, 1, 2])
    # default: the digits models; kws_dscnn has its own data splits and benchmark (benchmarks/kws.py)
    names = list(model_names or [n for n, e in models.manifest()["models"].items() if "splits" not in e])
    unknown = [n for n in names if n not in models.manifest()["models"]]
    if unknown:
        raise click.ClickException(f"--model {unknown[0]}: not shipped; choose from {', '.join(models.manifest()['models'])}.")
    own = [n for n in names if "splits" in models.manifest()["models"][n]]
    if own:
        raise click.ClickException(f"--model {own[0]}: it has its own data splits; benchmark it with "
                                   "python benchmarks/kws.py.")
    results = {"machine": machine(), "quick": quick, "settings": {
        "threads": 1, "batch": 32, "budgets_epochs": list(budgets) or ([30] if quick else [30, 300]), "seeds": seeds, "folds": folds,
        "m": list(MS), "qzo_lr_grid": QZO_LR, "backprop_lr_grid": BACKPROP_LR, "cost_batches": [32, 256],
        "memory_batches": [32, 256]}, "models": {}}
    s = results["settings"]
    sizes = {n: models.path(models.manifest()["models"][n]["variants"]["fp32"]["file"]).stat().st_size for n in names}
    previous = _reusable(reuse, s) if reuse else None
    if previous is not None:
        same_seeds = previous["settings"]["seeds"] == seeds
        results["reused"] = {"commit": previous["machine"]["commit"], "date": previous["machine"]["date"],
                             "sections": sorted({"accuracy", "cost", "memory"} - only), "backprop_rows": same_seeds}
        if not same_seeds and "accuracy" in only:
            results["reused"]["note"] = (f"Its backprop rows ran seeds {','.join(map(str, previous['settings']['seeds']))}; "
                                         "these were computed afresh for the seeds of this run")
            log(f"--reuse {reuse}: its backprop rows ran other seeds; computing them afresh for seeds {seeds}")
    for name in names:
        log(f"{name}:")
        res = results["models"][name] = {"fp32_bytes": sizes[name]}
        old = previous["models"].get(name, {}) if previous is not None else {}
        for section, key in (("cost", "step_cost"), ("memory", "memory")):
            if section not in only and key in old:
                res[key] = old[key]
        if "accuracy" in only:
            # rows from before run.py recorded their seeds ran the previous file's
            bp_rows = {b: [{"seeds": previous["settings"]["seeds"], "folds": previous["settings"].get("folds", 1), **row}
                           for row in [r["backprop"], *r.get("backprop_deep", {}).values()] if row]
                       for b, r in old.get("accuracy", {}).get("budgets", {}).items()}
            res["accuracy"] = run_accuracy(name, s["budgets_epochs"], s["seeds"], s["batch"], quick, bp_rows, rows,
                                           folds)
        if "cost" in only:
            res["step_cost"] = run_cost(name, s["cost_batches"], quick)
        if "memory" in only:
            res["memory"] = run_memory(name, s["memory_batches"])
    results["largest_model"] = max(names, key=sizes.get)
    out = pathlib.Path(out)
    modelio.save_json(out / "latest.json", results)
    text = report.markdown(results)
    modelio.write_bytes(out / "latest.md", text.encode())
    report.plot(results, out / "latest.png")
    print(text)
    log(f"wrote {out / 'latest.json'}, {out / 'latest.md'}, {out / 'latest.png'}")


def parse_seeds(text: str) -> list[int]:
    """--seeds: distinct non-negative integers, comma-separated."""
    try:
        seeds = [int(t) for t in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) < len(seeds):
        raise click.BadParameter(f"{text!r}: give distinct non-negative integers separated by commas, e.g. 0,1,2,3,4.",
                                 param_hint="--seeds")
    return seeds


def _reusable(path, settings: dict) -> dict:
    import json
    previous = json.loads(pathlib.Path(path).read_text())
    keys = ("batch", "backprop_lr_grid", "threads")     # other seeds: its backprop rows are not reused
    changed = [k for k in keys if previous["settings"].get(k) != settings[k]]
    changed += [] if set(settings["budgets_epochs"]) <= set(previous["settings"]["budgets_epochs"]) else ["budgets"]
    if changed:
        raise click.ClickException(f"--reuse {path}: its settings differ ({', '.join(changed)}); run without --reuse.")
    return previous


if __name__ == "__main__":
    main()
