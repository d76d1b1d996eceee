"""adapt: what `fgcompile adapt` gives with its defaults, and what replay keeps of the source domain.

Each row runs fgcompile.adapt.run_adapt (the command's code: compile with the training data as calibration,
tune by 5-fold cross-validation at the epochs it trains, train, export) on a shipped model's target-train
split, once per seed (TrainSpec(seed=s): perturbations, batch order and folds), and scores the exported
int8 model on the target and source test splits. `--replay` rows train the source-train split alongside.

The backprop column is fp32 Adam of the same tensors under the same protocol (5-fold lr choice, the same
seeds' batch order), read from the result file named beside it (benchmarks/accuracy.py and kws.py make
them; rerun those to refresh it).

    python benchmarks/adapt.py --model digits_cnn --epochs 300 --seeds 0,1,2
    python benchmarks/adapt.py --model digits_cnn --epochs 30 --seeds 0,1,2 --replay both
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

from fgcompile import models
from fgcompile.adapt import run_adapt
from fgcompile.demo import TASKS, task_files
from fgcompile.spec import TrainSpec

RESULTS = pathlib.Path(__file__).parent / "results"
# fp32 Adam backprop of the same tensors, 5-fold lr choice: (file, mean exported-comparable test accuracy %)
BACKPROP = {("digits_cnn", 300): ("accuracy-defaults.md", 93.5), ("digits_attn", 300): ("accuracy-defaults.md", 80.5),
            ("digits_cnn", 30): ("accuracy-defaults.md", 91.1), ("digits_attn", 30): ("accuracy-defaults.md", 78.0),
            ("kws_dscnn", 30): ("kws.md", 95.3)}


def files_of(model: str) -> dict:
    task = {v or models.manifest()["default"]: k for k, v in TASKS.items()}.get(model)
    if task is not None:
        return task_files(task)
    man = models.manifest()
    entry = man["models"][model]
    return {"model": models.path(entry["variants"]["w8a8"]["file"]),
            **{k: models.path(v) for k, v in entry.get("splits", man["data"]).items()}}


def run(model: str, epochs: int, seed: int, replay: bool) -> dict:
    f = files_of(model)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        r = run_adapt(f["model"], f["target_train"], pathlib.Path(tmp) / "a", epochs=epochs, spec=TrainSpec(seed=seed),
                      val=f["target_test"], source=f["source_test"], replay=f["source_train"] if replay else None,
                      echo=lambda s: None, progress=False)
    pct = lambda res, split: round(100 * res[split]["accuracy"], 2)
    return {"model": model, "epochs": epochs, "seed": seed, "replay": replay, "lr": r["lr"],
            "seconds": round(time.perf_counter() - t0, 1),
            **{f"{when}_{split[:6]}": pct(r[when], split) for when in ("before", "after", "exported")
               for split in ("target_test", "source_test")}}


def table(rows: list[dict]) -> list[str]:
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["epochs"], r["replay"]), []).append(r)
    lines = ["| model | epochs | replay | seeds | target before → exported | source before → exported | "
             "fp32 backprop (target) | exported − backprop |", "|---|---|---|---|---|---|---|---|"]
    for (model, epochs, replay), rs in sorted(groups.items()):
        ms = lambda k: (statistics.mean(r[k] for r in rs), statistics.pstdev(r[k] for r in rs))
        (tb, _), (te, tsd), (sb, _), (se, ssd) = ms("before_target"), ms("exported_target"), ms("before_source"), \
            ms("exported_source")
        bp = BACKPROP.get((model, epochs))
        lines.append(f"| {model} | {epochs} | {'source train' if replay else 'none'} | "
                     f"{','.join(str(r['seed']) for r in rs)} | {tb:.1f} → {te:.1f} ± {tsd:.1f} | "
                     f"{sb:.1f} → {se:.1f} ± {ssd:.1f} | " + (f"{bp[1]:.1f} ({bp[0]}) | {te - bp[1]:+.1f} |"
                                                              if bp else "– | – |"))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--epochs", type=int, action="append", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--replay", choices=["no", "yes", "both"], default="no")
    ap.add_argument("--out", default=str(RESULTS / "adapt.json"), help="JSON rows; merged with the file's rows")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    for model in a.model:
        for epochs in a.epochs:
            for replay in {"no": [False], "yes": [True], "both": [False, True]}[a.replay]:
                for seed in map(int, a.seeds.split(",")):
                    row = run(model, epochs, seed, replay)
                    print(json.dumps(row), flush=True)
                    rows = [r for r in rows if (r["model"], r["epochs"], r["seed"], r["replay"]) !=
                            (model, epochs, seed, replay)] + [row]
                    out.write_text(json.dumps({"rows": rows}, indent=1))
    lines = table(rows)
    out.with_suffix(".md").write_text("# `fgcompile adapt` with its defaults (python benchmarks/adapt.py)\n\n"
                                      + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
