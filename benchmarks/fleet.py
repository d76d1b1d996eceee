"""fleet: a fleet of 20 simulated devices per shipped task, each with its own shift (models/data/fleet_*.npz),
adapting alone, in federated rounds and centrally on their pooled data, with `fgcompile fleet`'s defaults.

Each row runs fgcompile.fleet.run_fleet (the command's code: compile with the pooled training data as
calibration, tune the rate by 5-fold cross-validation on it, then the three modes) once per seed
(TrainSpec(seed=s): perturbations, device seeds, batch order, folds). It prints per mode the mean, min and
max over devices of the accuracy on each device's own test data, the source test accuracy, and what a
device uploads per round: its signs, the integer update it would send instead, the trained weights.
With --flower, the first seed's federated rounds run again on Flower's simulation engine and the two
federated models are compared byte for byte. With --replay the task's source training split is dealt out to
the devices (`fleet --replay`).

    python benchmarks/fleet.py --task digits --seeds 0,1,2 [--flower] [--replay]
"""
from __future__ import annotations

import argparse
import filecmp
import json
import pathlib
import statistics
import tempfile
import time

from fgcompile import models
from fgcompile.fleet import run_fleet
from fgcompile.spec import TrainSpec

RESULTS = pathlib.Path(__file__).parent / "results"
TASKS = {"digits": ("digits_cnn", "fleet_digits.npz", "digits_source_test.npz", "digits_source_train.npz"),
         "kws": ("kws_dscnn", "fleet_kws.npz", "kws_source_test.npz", "kws_source_train.npz")}


def files(task: str) -> tuple:
    model, data, source, replay = TASKS[task]
    return (models.path(f"{model}/w8a8.onnx"), models.path(f"data/{data}"), models.path(f"data/{source}"),
            models.path(f"data/{replay}"))


def run(task: str, seed: int, out: pathlib.Path, backend: str = "local", modes=None,
        replay: bool = False) -> tuple[dict, float]:
    model, data, source, source_train = files(task)
    t0 = time.perf_counter()
    report = run_fleet(model, data, out, spec=TrainSpec(seed=seed), source=source, backend=backend,
                       replay=source_train if replay else None,
                       **({"modes": modes} if modes else {}), echo=lambda s: None, show=lambda s: None)
    return report, time.perf_counter() - t0


def table(task: str, reports: list[dict], seconds: list[float], identical: bool | None) -> list[str]:
    modes = reports[0]["modes"]
    mean = lambda f: statistics.fmean(f(r) for r in reports)
    sd = lambda f: statistics.pstdev([f(r) for r in reports])
    lines = [f"### {task}: {len(reports[0]['devices'])} devices, {len(reports)} seeds, "
             f"{reports[0]['schedule']['rounds']} rounds of {reports[0]['schedule']['local_epochs']} local epoch, "
             f"batch {reports[0]['schedule']['batch']}, {statistics.fmean(seconds):.0f} s per seed", "",
             "| mode | device test, mean over devices | min | max | source test |", "|---|---|---|---|---|"]
    for m in modes:
        src = (lambda r: r["source"][m]["mean"] if isinstance(r["source"][m], dict) else r["source"][m])
        lines.append(f"| {m} | {100 * mean(lambda r: r['summary'][m]['mean']):.1f} ± "
                     f"{100 * sd(lambda r: r['summary'][m]['mean']):.1f} | {100 * mean(lambda r: r['summary'][m]['min']):.1f} "
                     f"| {100 * mean(lambda r: r['summary'][m]['max']):.1f} | {100 * mean(src):.1f} |")
    u = reports[0]["upload"]
    if "centralized" in modes:
        gap = 100 * mean(lambda r: r["summary"]["federated"]["mean"] - r["summary"]["centralized"]["mean"])
        lines += ["", f"federated − centralized: **{gap:+.1f}** points (mean over seeds of the device means)."]
    lines += ["",
              f"Uploaded per device per round (seed {reports[0]['schedule']['seed']}): signs **{u['bytes_per_round']:.1f} bytes = "
              f"{u['bits_per_step']:.2f} bits per step** at m = {u['m']} ({u['steps_per_round']:.0f} steps); "
              f"as an integer update {u['update_bytes_per_round']:.0f} bytes; as the trained weights "
              f"{u['weights_bytes']} bytes."]
    if identical is not None:
        lines.append(f"Flower's simulation engine (Ray backend) against the local backend, federated model: "
                     f"{'byte-identical' if identical else 'DIFFERENT'}.")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=list(TASKS), default="digits")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--flower", action="store_true", help="also run the first seed's federated rounds on Flower")
    ap.add_argument("--replay", action="store_true", help="deal the source training split out to the devices")
    ap.add_argument("--modes", default=None, help="comma-separated modes (default: all); results get their names")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    modes = a.modes.split(",") if a.modes else None
    reports, seconds, identical = [], [], None
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            report, s = run(a.task, seed, pathlib.Path(tmp) / f"s{seed}", replay=a.replay, modes=modes)
            reports.append(report)
            seconds.append(s)
            print(f"seed {seed}: {s:.0f} s, " + ", ".join(f"{m} {v['mean']:.3f}" for m, v in report["summary"].items()),
                  flush=True)
        if a.flower:
            run(a.task, seeds[0], pathlib.Path(tmp) / "flower", backend="flower", modes=["federated"], replay=a.replay)
            identical = filecmp.cmp(pathlib.Path(tmp) / f"s{seeds[0]}" / "federated.onnx",
                                    pathlib.Path(tmp) / "flower" / "federated.onnx", shallow=False)
    lines = table(a.task + (f" with {reports[0]['replayed']} source examples replayed" if a.replay else ""), reports,
                  seconds, identical)
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    name = f"fleet-{a.task}" + ("-replay" if a.replay else "") + (f"-{'-'.join(modes)}" if modes else "")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({"reports": reports, "seconds": seconds,
                                                              "flower_identical": identical}, indent=1))


if __name__ == "__main__":
    main()
