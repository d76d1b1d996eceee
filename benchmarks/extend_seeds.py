"""Add seeds to one accuracy row of an earlier run.py result, running only the new seeds.

    python benchmarks/extend_seeds.py PREVIOUS.json --row 'w16a8 m=64 H=4 whiten --schedule cosine' \
        --model digits_attn --epochs 300 --seeds 3,4 --out DIR [--run NAME]

run.py's protocol for seeds S_old + S_new, on both the QZO-FF row and the fp32 backprop row of its tensors:
every run is a deterministic function of (code, rate, seed), so the earlier file's validation mean over
S_old at each rate and its per-seed test runs stand for those seeds; the new seeds' validation runs are
added to each rate's mean ((|S_old|·mean_old + Σ new) / |S|), the rate is chosen on that mean, and the
test runs of the new seeds are added (all seeds run afresh if the chosen rate changed). Valid only where
the code computes the same integers as the earlier run's (check: a re-run of one earlier seed matches its
run, `--check`). Writes DIR/latest.{json,md} as run.py does, the settings naming both seed sets.
PREVIOUS: run.py's latest.json, or a file of several ({"runs": {NAME: latest.json}}) with --run NAME.
"""
from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time

import click
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import accuracy  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
from fgcompile import models, modelio  # noqa: E402
from fgcompile.compiler import compile_model  # noqa: E402
from fgcompile.spec import TrainSpec  # noqa: E402


def extend(previous: dict, old_seeds: list[int], new_seeds: list[int], train, test, epochs: int, batch: int,
           fit_score, test_runs) -> tuple[object, dict, list, bool]:
    """(chosen rate, validation means over all seeds, per-seed test results, whether the old ones were
    reused). fit_score(lr, seed, fit, val): one validation run; test_runs(lr, seeds): their test results."""
    fit, val = accuracy.holdout(*train)
    grid = [float(k) for k in previous["validation"]]
    n_old, n = len(old_seeds), len(old_seeds) + len(new_seeds)
    scores = {lr: (n_old * previous["validation"][k] + sum(fit_score(lr, s, fit, val) for s in new_seeds)) / n
              for lr, k in zip(grid, previous["validation"])}
    best = max(sorted(grid), key=lambda lr: scores[lr])         # accuracy.select: the first best in grid order
    if best == float(previous["lr"]):
        return best, scores, list(previous["old_runs"]) + test_runs(best, new_seeds), True
    return best, scores, test_runs(best, old_seeds + new_seeds), False


@click.command()
@click.argument("previous_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--run", "run_name", default=None, help="The run in a file of several runs.")
@click.option("--row", required=True, help="The QZO-FF row's label, exactly as in the file.")
@click.option("--model", "name", required=True)
@click.option("--epochs", type=int, required=True)
@click.option("--seeds", "seed_list", required=True, help="The seeds to add, comma-separated.")
@click.option("--check", "check_seed", type=int, default=None,
              help="Also re-run this earlier seed at the earlier rate and require its earlier test results.")
@click.option("--backprop", "backprop_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A run.py/extend_seeds.py latest.json whose backprop row of the same tensors, epochs and all "
                   "the seeds is used as it is (backprop does not depend on the QZO-FF row).")
@click.option("--out", required=True, type=click.Path(file_okay=False))
def main(previous_file, run_name, row, name, epochs, seed_list, check_seed, backprop_file, out):
    doc = json.loads(pathlib.Path(previous_file).read_text())
    prev = doc["runs"][run_name] if run_name else doc
    old_seeds, new_seeds = list(prev["settings"]["seeds"]), run.parse_seeds(seed_list)
    if set(old_seeds) & set(new_seeds):
        raise click.ClickException(f"--seeds {seed_list}: the file already ran seeds {old_seeds}.")
    budget = prev["models"][name]["accuracy"]["budgets"][str(epochs)]
    q_old, bp_old = budget["qzo_ff"][row], budget["backprop"]
    given = json.loads(pathlib.Path(backprop_file).read_text())["models"][name]["accuracy"]["budgets"] \
        .get(str(epochs), {}).get("backprop") if backprop_file else None
    if backprop_file and (given is None or (given.get("tensors"), given.get("seeds")) != (bp_old["tensors"],
                                                                                       old_seeds + new_seeds)):
        raise click.ClickException(f"--backprop {backprop_file}: it has no {epochs}-epoch backprop row of "
                                   f"{bp_old['tensors']} on seeds {old_seeds + new_seeds}.")
    label, variant, bits, m, extra = next(c for c in run.QZO_CONFIGS if c[0] == row)
    entry = models.manifest()["models"][name]["variants"]
    train, test = run.load("target_train"), run.load("target_test")
    source = modelio.load_model(models.path(entry[variant]["file"]))
    fp32 = modelio.load_model(models.path(entry["fp32"]["file"]))
    batch = prev["settings"]["batch"]
    options = {k: v for k, v in extra.items() if k not in run.RUN_KEYS}
    schedule = extra.get("schedule", "constant")
    spec = lambda lr, seed: TrainSpec(m=m, bits=bits, lr=lr, seed=seed, **options)

    def q_score(lr, seed, fit, val):
        return accuracy.qzo_ff(source, spec(lr, seed), fit, val, epochs, batch, schedule)

    def q_tests(lr, seeds):
        return [accuracy.qzo_ff(source, spec(lr, s), train, test, epochs, batch, schedule, exported=True) for s in seeds]

    def bp_net(lr, seed, tr):
        import backprop
        return backprop.fine_tune(fp32, bp_old["tensors"], *tr, epochs, batch, lr, seed)

    def bp_score(lr, seed, fit, val):
        import backprop
        return backprop.accuracy(bp_net(lr, seed, fit), *val)

    def bp_tests(lr, seeds):
        import backprop
        return [backprop.accuracy(bp_net(lr, s, train), *test) for s in seeds]

    t0 = time.perf_counter()
    if check_seed is not None:
        i = old_seeds.index(check_seed)
        again = q_tests(q_old["lr"], [check_seed])[0]
        before = (q_old["runs"][i], q_old["exported"]["runs"][i])
        if tuple(round(v, 4) for v in again) != before:
            raise click.ClickException(f"seed {check_seed} at lr {q_old['lr']}: now {again}, the file has {before}; "
                                       "the code computes other integers, so its runs cannot be reused.")
        run.log(f"  check: seed {check_seed} reproduces {before}")
    q_lr, q_val, q_runs, q_reused = extend(
        {**q_old, "old_runs": list(zip(q_old["runs"], q_old["exported"]["runs"]))}, old_seeds, new_seeds, train, test,
        epochs, batch, q_score, q_tests)
    run.log(f"  {name} {epochs} epochs QZO-FF {row}: lr {q_lr} ({time.perf_counter() - t0:.0f} s)")
    if given is not None:
        bp_lr, bp_val, bp_runs = given["lr"], {float(k): v for k, v in given["validation"].items()}, given["runs"]
        bp_reused = f"the backprop row of {backprop_file}"
    else:
        bp_lr, bp_val, bp_runs, bp_reused = extend({**bp_old, "old_runs": bp_old["runs"]}, old_seeds, new_seeds,
                                                   train, test, epochs, batch, bp_score, bp_tests)
    run.log(f"  {name} {epochs} epochs backprop: lr {bp_lr} ({time.perf_counter() - t0:.0f} s)")
    seeds = old_seeds + new_seeds
    final, exported = [t for t, _ in q_runs], [e for _, e in q_runs]
    contract = compile_model(source, spec(q_lr, 0), calibration=train[0]).contract
    provenance = {"file": str(previous_file), "run": run_name, "commit": prev["machine"]["commit"],
                  "seeds": old_seeds, "qzo_ff_runs_reused": q_reused, "backprop_runs_reused": bp_reused,
                  "validation_means_reused": True, "check_seed": check_seed}
    qrow = {"variant": variant, "m": m, "lr": q_lr, "eps": contract.spec.eps, "options": extra,
            "branches": contract.branches, "validation": {str(k): round(v, 4) for k, v in q_val.items()},
            **accuracy.summary(final), "exported": accuracy.summary(exported), "extended_from": provenance}
    bprow = {"tensors": bp_old["tensors"], "optimizer": "adam", "lr": bp_lr, "seeds": seeds,
             "validation": {str(k): round(v, 4) for k, v in bp_val.items()}, **accuracy.summary(bp_runs),
             "extended_from": provenance}
    results = {"machine": run.machine(), "quick": False, "settings": {**prev["settings"], "seeds": seeds,
                                                                     "budgets_epochs": [epochs]},
               "extended": provenance,
               "models": {name: {"accuracy": {"untrained": prev["models"][name]["accuracy"]["untrained"],
                                              "budgets": {str(epochs): {"examples": budget["examples"],
                                                                        "qzo_ff": {row: qrow}, "backprop": bprow}}}}},
               "largest_model": name}
    out = pathlib.Path(out)
    modelio.save_json(out / "latest.json", results)
    text = report.markdown(results)
    modelio.write_bytes(out / "latest.md", text.encode())
    print(text)
    run.log(f"wrote {out / 'latest.json'}; {np.mean(exported):.2%} exported vs backprop {statistics.mean(bp_runs):.2%}")


if __name__ == "__main__":
    main()
