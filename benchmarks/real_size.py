"""Real-size models (1000 classes): fgcompile's training step against its peers, time and peak memory.

    python models/recipes/build_bench.py --only mobilenetv2_1000 --only resnet18_1000 --only resnet18_1000_224
    python benchmarks/real_size.py              # writes benchmarks/results/real-size.{json,md}
    python benchmarks/real_size.py --quick      # the classifier and the last block only, 96x96 models only

Per model and trained part (the classifier `--last 1`, the last block and the classifier, one mid-network
conv), at batch 32 and one thread, the columns are
    forward     one int8 forward of the inference model (onnxruntime)
    fg default  fgcompile compiled with TrainSpec()'s defaults, only last/train set (--estimator auto: node
                perturbation, m = 8, when more than one layer trains, m = 16 at one hidden Conv; the head
                estimator at the classifier alone; no calibration, so no whitening). The estimator and reason
                auto chose are recorded per row.
    fg sign     --estimator sign (Sign-m-SPSA, m = 64): auto's choice at one hidden layer before node took it
    fg exact    the defaults with --forward exact (every frozen op in integers: the same step on every runtime)
    fg qdq      the defaults with --forward qdq (the source's QDQ ops, fused and rounded as each runtime does)
    fg m=8      the same with m = 8;  fg loop m=8: and --branches loop (auto still picks node at depth:
                node takes the loop form, so this is node perturbation in the loop when more than one layer trains)
    fg node m=8 --estimator node --m 8 (node perturbation, stacked; Gemm/MatMul and Conv sites)
    fg node loop m=8  the same with --branches loop: the 2m noisy branches one at a time in an ONNX Loop
    fg planned memory  the defaults' graph in a session with onnxruntime's memory pattern on (its default; the
                runtime turns it off for train.onnx: fgcompile.session.TRAINING_MEMORY_PATTERN)
    torch BP    torch fp32 autograd of the same tensors (benchmarks/backprop.py's interpreter of the fp32
                model; only those tensors require grad), an SGD step
    MeZO m=8    torch fp32 MeZO (benchmarks/mezo.py): 2 whole-model forwards per direction, perturbed in place
    ort-training  onnxruntime-training backprop (SGD) of the same tensors, where --ort-training-python names
                an interpreter that has it (it cannot share a process with onnxruntime: it replaces it).
                A venv with onnxruntime-training==1.19.2, torch and onnx==1.16.2 works (1.19.2 loads IR <= 10).
Time: ms per step, the columns interleaved round-robin in this process, median of --repeats blocks
(benchmarks/step_cost.py's `timed`); a column whose first call takes longer than --slow seconds is timed by
one more call alone (noted `n=1`). ort-training is timed in its own process. Memory: VmHWM of a fresh
process per column (benchmarks/memory.py), inference included. A compile that needs more than --limit-gb or
more than --compile-s seconds, or a training job over --limit-gb, is recorded as that row's result.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile
import time

import click
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "models" / "recipes"))

import accuracy  # noqa: E402
import memory  # noqa: E402
from build_bench import CACHE  # noqa: E402
from deep import data, depths  # noqa: E402
from fgcompile import modelio  # noqa: E402
from fgcompile.runtime.trainer import Trainer  # noqa: E402
from fgcompile.session import make_session  # noqa: E402
from run import machine  # noqa: E402
from step_cost import step_feeds, timed  # noqa: E402

MODELS = ("mobilenetv2_1000", "resnet18_1000", "resnet18_1000_224")
PARTS = ("last 1", "last block", "mid")
FG = {"fg default": {}, "fg exact": {"forward": "exact"}, "fg qdq": {"forward": "qdq"}, "fg m=8": {"m": 8}, "fg loop m=8": {"m": 8, "branches": "loop"},
      "fg node m=8": {"estimator": "node", "m": 8},
      "fg node loop m=8": {"estimator": "node", "m": 8, "branches": "loop"},
      "fg planned memory": {}, "fg sign": {"estimator": "sign"}}
PLANNED = {"fg planned memory"}   # its session plans memory as onnxruntime's default does (the previous form)
MEZO_M = 8
COLUMNS = ("forward", *FG, "torch BP", f"MeZO m={MEZO_M}", "ort-training")


def parts(name: str, source) -> dict:
    """{label: TrainSpec fields} of the trained parts: deep.py's depths of the same architecture."""
    found = depths(name.split("_")[0], source)
    return {label: options for label, options in found.items() if label.startswith(PARTS)}


def fg_compile(path, options: dict, folder: pathlib.Path, limit_mb: float, seconds: float) -> dict:
    """Compile in a fresh process (so a compile past the limits is stopped, not this benchmark)."""
    try:
        return memory.measure("compile", timeout=seconds, limit_mb=limit_mb, model=str(path), spec=options,
                              out=str(folder))
    except memory.JobLimit as exc:
        return {"error": f"compile {str(exc).split(': ', 1)[1]}"}
    except RuntimeError as exc:
        return {"error": "compile failed: " + str(exc).strip().splitlines()[-1][:200]}


def peak(job: str, limit_mb: float, **args) -> dict:
    try:
        return memory.measure(job, timeout=900, limit_mb=limit_mb, **args)
    except memory.JobLimit as exc:
        return {"error": f"needs {str(exc).split(': ', 1)[1]}" if "GB" in str(exc) else str(exc)}
    except RuntimeError as exc:
        return {"error": str(exc).strip().splitlines()[-1][:200]}


def fg_step(folder: pathlib.Path, x, y, planned: bool = False):
    trainer = Trainer(folder, threads=1)
    contract, state = trainer.contract, dict(trainer.initial_state)
    session = make_session(str(folder / "train.onnx"), 1, training=not planned)
    outputs, step_no = [o.name for o in session.get_outputs()], [0]

    def step():   # as the Trainer runs it: a new step number, the previous step's state fed back
        step_no[0] += 1
        out = dict(zip(outputs, session.run(outputs, step_feeds(contract, x, y, step_no[0], state))))
        state.update({s.name: out[s.output] for s in contract.state})
    return step


def torch_steps(fp32, trained: list[str], x, y) -> dict:
    import torch
    from backprop import OnnxTorch
    from mezo import mezo_step
    torch.set_num_threads(1)
    net = OnnxTorch(fp32, trained)
    params = list(net.params.values())
    opt = torch.optim.SGD(params, 1e-3)
    xs, ys = torch.tensor(x), torch.tensor(y)
    ce = torch.nn.functional.cross_entropy
    step_no = [0]

    def backprop():
        opt.zero_grad()
        ce(net(xs), ys).backward()
        opt.step()

    def mezo():
        step_no[0] += 1
        mezo_step(params, lambda: ce(net(xs), ys), MEZO_M, 1e-3, 1e-6, step_no[0])
    return {"torch BP": backprop, f"MeZO m={MEZO_M}": mezo}


def round_robin(fns: dict, repeats: int, slow: float) -> dict:
    """ms per call: one warm-up call each; those under `slow` s interleaved in `repeats` blocks (median),
    the others timed by one more call each."""
    first = {}
    for key, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[key] = time.perf_counter() - t0
    fast = {k: fn for k, fn in fns.items() if first[k] <= slow}
    calls = max(1, min(10, int(0.5 / max([first[k] for k in fast] or [1]))))
    ms = {k: round(v / 1e3, 1) for k, v in timed(fast, repeats, calls, warmup=0).items()} if fast else {}
    for key in fns.keys() - fast.keys():
        t0 = time.perf_counter()
        fns[key]()
        ms[key] = {"ms": round((time.perf_counter() - t0) * 1e3, 1), "n": 1}
    return ms


def ort_training(python: str, fp32_path, trained, npz, repeats: int, limit_mb: float) -> tuple[dict, dict]:
    """(time, memory) of onnxruntime-training's SGD backprop, run by `python` (ort_training.py)."""
    cmd = [python, str(HERE / "ort_training.py"), json.dumps({"model": str(fp32_path), "trained": trained,
                                                               "data": str(npz), "repeats": repeats})]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"error": "over 900 s"}, {"error": "over 900 s"}
    if proc.returncode != 0:
        error = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
        return error, error
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["peak_mb"] > limit_mb:
        return {"error": f"needs over {limit_mb / 1024:.0f} GB"}, {"error": f"needs over {limit_mb / 1024:.0f} GB"}
    return out["ms"], {k: out[k] for k in ("baseline_mb", "peak_mb", "model_mb")}


def run_row(name, label, options, path, fp32_path, source, fp32, work: pathlib.Path, args) -> dict:
    limit_mb = args["limit_gb"] * 1024
    x, y = data(source, args["batch"])
    npz = work / "data.npz"
    np.savez(npz, x=x, y=y)
    row = {"model": name, "trained": label, "batch": args["batch"], "ms": {}, "memory": {}, "compile": {}}
    fns = {"forward": (lambda s=make_session(source, 1), n=source.graph.input[0].name: s.run(None, {n: x}))}
    row["memory"]["forward"] = peak("inference", limit_mb, model=str(path), data=str(npz), batch=args["batch"],
                                    iterations=args["iterations"])
    trained = None
    for column, extra in FG.items():
        if column not in args["columns"]:
            continue
        folder = work / column.replace(" ", "_").replace("=", "")
        compiled = fg_compile(path, options | extra, folder, limit_mb, args["compile_s"])
        row["compile"][column] = compiled
        if "error" in compiled:
            row["ms"][column] = row["memory"][column] = {"error": compiled["error"]}
            continue
        mem = peak("training", limit_mb, compiled=str(folder), data=str(npz), batch=args["batch"],
                   iterations=args["iterations"], planned=column in PLANNED)
        row["memory"][column] = mem
        if "error" in mem:
            row["ms"][column] = {"error": mem["error"]}
            continue
        trainer = Trainer(folder)
        row.setdefault("branches", {})[column] = trainer.contract.branches
        row.setdefault("estimator", {})[column] = {"estimator": trainer.contract.spec.estimator,
                                                   "m": trainer.contract.spec.m,
                                                   "reason": trainer.contract.estimator_reason}
        state_names = [s.name for s in trainer.contract.state]
        trained = trained or accuracy.fp32_names(source, fp32, state_names)
        row["params"] = sum(int(np.prod(v.shape)) for v in trainer.initial_state.values())
        fns[column] = fg_step(folder, x, y, column in PLANNED)
    if trained is None:   # no fgcompile column compiled: the torch peers still need the tensors' names
        row["ms"]["torch BP"] = row["memory"]["torch BP"] = {"error": "no fgcompile compile to name the tensors"}
        return row
    row["fp32_trained"] = trained
    for column, job, extra in (("torch BP", "backprop", {"optimizer": "sgd"}), (f"MeZO m={MEZO_M}", "mezo", {"m": MEZO_M})):
        if column not in args["columns"]:
            continue
        row["memory"][column] = peak(job, limit_mb, model=str(fp32_path), trained=trained, data=str(npz),
                                     batch=args["batch"], iterations=args["iterations"], **extra)
    fns |= {k: fn for k, fn in torch_steps(fp32, trained, x, y).items() if "error" not in row["memory"].get(k, {"error": 0})}
    row["ms"] |= round_robin(fns, args["repeats"], args["slow"])
    if args["ort_training_python"] and "ort-training" in args["columns"]:
        row["ms"]["ort-training"], row["memory"]["ort-training"] = ort_training(
            args["ort_training_python"], fp32_path, trained, npz, args["repeats"], limit_mb)
    return row


def _ms(cell):
    return cell if isinstance(cell, (int, float)) else (cell or {}).get("ms")


def _mb(cell):
    return (cell or {}).get("peak_mb")


def ratios(row: dict) -> dict:
    """Each column's time over the forward's and torch BP's, and its peak over inference's and torch BP's."""
    ms, mb = {k: _ms(v) for k, v in row["ms"].items()}, {k: _mb(v) for k, v in row["memory"].items()}
    div = lambda a, b: round(a / b, 2) if a and b else None
    return {"ms_over_forward": {k: div(v, ms.get("forward")) for k, v in ms.items()},
            "ms_over_torch_bp": {k: div(v, ms.get("torch BP")) for k, v in ms.items()},
            "mb_over_inference": {k: div(v, mb.get("forward")) for k, v in mb.items()},
            "mb_over_torch_bp": {k: div(v, mb.get("torch BP")) for k, v in mb.items()}}


def _cell(value, over_a, over_b, unit_fmt) -> str:
    if isinstance(value, dict) and "error" in value:
        return value["error"]
    if value is None:
        return "-"
    text = unit_fmt(value)
    parts = [f"{over_a:.2f}×" if over_a else "", f"{over_b:.2f}× BP" if over_b else ""]
    return text + (f" ({', '.join(p for p in parts if p)})" if any(parts) else "")


def report(result) -> str:
    m = result["machine"]
    columns = [c for c in COLUMNS if any(c in r["ms"] or c in r["memory"] for r in result["rows"])]
    head = "| model | trained | params | " + " | ".join(columns) + " |\n" + "|---" * (3 + len(columns)) + "|"
    time_rows, mem_rows = [], []
    for r in result["rows"]:
        q, lead = r["ratios"], f"| {r['model']} | {r['trained']} | {r.get('params', '-')} | "
        time_rows.append(lead + " | ".join(_cell(
            r["ms"].get(c) if not isinstance(r["ms"].get(c), dict) or "error" in r["ms"][c] else r["ms"][c]["ms"],
            q["ms_over_forward"].get(c) if c != "forward" else None, q["ms_over_torch_bp"].get(c) if c != "torch BP" else None,
            lambda v, c=c: f"{v:.0f}" + (" n=1" if isinstance(r["ms"].get(c), dict) else "")) for c in columns) + " |")
        mem_rows.append(lead + " | ".join(_cell(
            r["memory"].get(c) if "error" in (r["memory"].get(c) or {}) else _mb(r["memory"].get(c)),
            q["mb_over_inference"].get(c) if c != "forward" else None, q["mb_over_torch_bp"].get(c) if c != "torch BP" else None,
            lambda v: f"{v:.0f}") for c in columns) + " |")
    return "\n".join([
        "# Real-size models (1000 classes): fgcompile against its peers (`benchmarks/real_size.py`)", "",
        f"{m['cpu']}, {m['cores']} cores (shared), onnxruntime {m['packages']['onnxruntime']}, torch "
        f"{m['packages']['torch']}, commit {m['commit']}, {m.get('date', '')}; batch {result['batch']}, one thread.",
        f"Command: `{result['command']}`", "",
        "## ms per step (× the int8 forward, × torch BP)", "", head, *time_rows, "",
        "## Peak resident MB of a fresh process (× inference, × torch BP)", "", head, *mem_rows, "",
        "## The estimator each fgcompile column compiled to (estimator, m: the contract's estimator_reason)", "",
        *[f"- {r['model']} {r['trained']}: " + "; ".join(f"{c}: {e['estimator']}, m={e['m']} ({e['reason']})"
                                                       for c, e in r.get("estimator", {}).items()) for r in result["rows"]],
        ""]) + "\n"


@click.command()
@click.option("--models", "names", default=",".join(MODELS), show_default=True)
@click.option("--parts", "part_names", default=",".join(PARTS), show_default=True, help="Labels' prefixes.")
@click.option("--skip", default="", show_default=True,
              help="model:part rows to leave out, e.g. resnet18_1000_224:mid (the slowest row, ~5 minutes).")
@click.option("--quick", is_flag=True, help="Only the classifier and the last block of the 96x96 models.")
@click.option("--batch", default=32, show_default=True)
@click.option("--repeats", default=5, show_default=True)
@click.option("--iterations", default=2, show_default=True, help="Steps per memory process (the peak comes in the first).")
@click.option("--slow", default=10.0, show_default=True, help="Seconds per call above which a column is timed once.")
@click.option("--limit-gb", default=8.0, show_default=True)
@click.option("--compile-s", default=300.0, show_default=True)
@click.option("--ort-training-python", default=None,
              help="A Python with onnxruntime-training installed (not this one: it replaces onnxruntime).")
@click.option("--columns", default=",".join(COLUMNS), show_default=True,
              help="The columns to run (the forward always runs; torch BP names the tensors' ratios' divisor).")
@click.option("--out", default=str(HERE / "results" / "real-size"), show_default=True)
def main(names, part_names, skip, quick, batch, repeats, iterations, slow, limit_gb, compile_s, ort_training_python,
         columns, out):
    names, wanted = names.split(","), tuple(part_names.split(","))
    if quick:
        names, wanted = [n for n in names if not n.endswith("_224")], ("last 1", "last block")
    skipped = {tuple(s.split(":")) for s in skip.split(",") if s}
    args = {"batch": batch, "repeats": repeats, "iterations": iterations, "slow": slow, "limit_gb": limit_gb,
            "compile_s": compile_s, "ort_training_python": ort_training_python, "columns": columns.split(",")}
    if unknown := set(args["columns"]) - set(COLUMNS):
        raise click.BadParameter(f"{sorted(unknown)}: not among {', '.join(COLUMNS)}", param_hint="--columns")
    result = {"machine": machine(), "batch": batch, "command": "python benchmarks/real_size.py " + " ".join(sys.argv[1:]),
              "skipped": sorted(":".join(s) for s in skipped), "rows": []}
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        path, fp32_path = CACHE / name / "w8a8.onnx", CACHE / name / "fp32.onnx"
        if not path.exists():
            raise SystemExit(f"{path} is missing: run python models/recipes/build_bench.py --only {name} first")
        source, fp32 = modelio.load_model(path), modelio.load_model(fp32_path)
        for label, options in parts(name, source).items():
            if not label.startswith(wanted) or any(name == m and label.startswith(p) for m, p in skipped):
                continue
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                row = run_row(name, label, options, path, fp32_path, source, fp32, pathlib.Path(tmp), args)
            row["ratios"], row["seconds"] = ratios(row), round(time.perf_counter() - t0)
            result["rows"].append(row)
            print(json.dumps({k: row[k] for k in ("model", "trained", "ms", "seconds")}), flush=True)
            _write(out.with_suffix(".json"), json.dumps(result, indent=1))
            _write(out.with_suffix(".md"), report(result))
    print(f"wrote {out}.json and {out}.md")


def _write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    main()
