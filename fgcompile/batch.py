"""batch: compile every .onnx in a folder, one child process (or Ray task) per model; one bad model never
stops the rest.

Each model runs in its own process (`python -m fgcompile.batch`), so a model that crashes the
interpreter, is killed by the OOM killer or hangs past --timeout becomes one row of the summary, not the
end of the run. Ctrl-C stops the running children promptly and still writes the summary of what finished.
With backend "ray" each model's load and compile is a Ray task instead (retried when its worker is lost);
the driver decides the output folders and writes them, so the folders and summary are the local backend's.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

from fgcompile import cluster, folder, modelio
from fgcompile.artifact import LAYOUT
from fgcompile.compiler import compile_model, write_compiled
from fgcompile.report import format_table
from fgcompile.errors import FgcompileError, OutputError, SpecError
from fgcompile.spec import TrainSpec

SUMMARY = "summary.json"
POLL = 0.05  # seconds between looks at the children


def compile_one(path: str, out_dir: str, spec: TrainSpec, force: bool = False) -> dict:
    """One model's summary row: compile it and write its folder (what a local child process runs)."""
    t0 = time.perf_counter()
    return written(path, compile_source(path, spec), out_dir, force, t0)


def compile_source(path: str, spec: TrainSpec):
    """The compiled model, or the text of the error that stopped it (what a Ray task runs)."""
    try:
        return compile_model(modelio.load_model(path), spec)
    except Exception as exc:  # an unexpected failure in one model is reported, not raised
        return _error_text(exc)


def written(path: str, compiled, out_dir, force: bool, t0: float) -> dict:
    """The row of one model once compile_source's result is written to out_dir (t0: when it started)."""
    row = {"model": pathlib.Path(path).name, "status": "ok", "trainable_params": None, "graph_bytes": None,
           "seconds": None, "error": None}
    if isinstance(compiled, str):
        row.update(status="error", error=compiled)
    else:
        try:
            dest = write_compiled(compiled, out_dir, force=force, source_path=path)
            row["trainable_params"] = int(sum(v.size for v in compiled.state.values()))
            row["graph_bytes"] = (dest / LAYOUT.train).stat().st_size
        except Exception as exc:
            row.update(status="error", error=_error_text(exc))
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _error_text(exc: Exception) -> str:
    return str(exc) if isinstance(exc, FgcompileError) else f"internal error: {type(exc).__name__}: {exc}"


def folder_name(model: pathlib.Path) -> str:
    """The output folder of one model: its stem, unless that is the summary's own name."""
    return model.stem if model.stem != SUMMARY else f"{model.stem}_model"


def _check_out(out_dir: pathlib.Path, models: list, force: bool) -> None:
    """OUT must be a folder (or new), and its summary.json new or one that batch wrote (any file, with force)."""
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder; -o takes the folder to write the compiled "
                          "models into. Choose another -o.")
    summary = out_dir / SUMMARY
    if os.path.isdir(summary):
        raise OutputError(f"{summary}: is a folder where batch writes its summary. Move it away, or choose another "
                          "-o.")
    modelio.check_output_file(summary, {p: "an input model" for p in models})
    if os.path.lexists(summary) and not force and not _is_summary(summary):   # a dangling symlink too
        raise OutputError(f"{summary}: exists and is not a summary fgcompile batch wrote; batch writes its summary "
                          "there. Move the file away, choose another -o, or pass --force to replace it.")
    try:   # now, not after every model has compiled into a folder it cannot write
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot write here ({exc.strerror}). Choose a writable folder with -o.") from None


def _is_summary(path: pathlib.Path) -> bool:
    try:
        rows = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(rows, list) and bool(rows) and all(isinstance(r, dict) and {"model", "status"} <= r.keys()
                                                         for r in rows)


def output_folders(models: list[pathlib.Path], out_dir: pathlib.Path) -> dict:
    """{model: its output folder, or why it gets none}, decided for every model before any compiles.

    A folder must be a folder of its own inside OUT: not OUT itself, a folder holding OUT (`..onnx`,
    `...onnx`) or the summary. Where several models map to one folder (`summary.json.onnx` and
    `summary.json_model.onnx`, or a symlink in OUT), the model whose stem is the folder's name keeps it
    (else the first by name) and the others fail, so no model's output silently replaces another's.
    """
    root = os.path.realpath(out_dir)
    reserved = {root: "the output folder itself", os.path.realpath(out_dir / SUMMARY): "the batch's summary file"}
    plan, claims = {}, collections.defaultdict(list)
    for model in models:
        dest = out_dir / folder_name(model)
        target = os.path.realpath(dest)
        what = reserved.get(target) or ("a folder that holds the output folder"
                                        if root.startswith(target.rstrip(os.sep) + os.sep) else None)
        if what:
            plan[model] = (f"{model.name}: its output folder {dest} would be {what}. Rename the model, e.g. to "
                           "model.onnx.")
        else:
            claims[target].append(model)
    for group in claims.values():
        group.sort(key=lambda m: (folder_name(m) != m.stem, m.name))
        first = group[0]
        plan[first] = out_dir / folder_name(first)
        for model in group[1:]:
            plan[model] = (f"{model.name}: its output folder {out_dir / folder_name(model)} is also {first.name}'s, "
                           "and one would replace the other. Rename one of the two models.")
    return plan


def batch_compile(in_dir, out_dir, spec: TrainSpec, jobs: int | None = None, timeout: float = 600.0,
                  force: bool = False, on_done=None, backend: str = "local",
                  address: str | None = None) -> tuple[list[dict], bool]:
    """(rows sorted by model, interrupted). backend "local": at most min(jobs (default 2), models, CPUs)
    child processes at once; "ray": one Ray task per model (fgcompile/cluster.py), at most jobs (default the
    cluster's CPUs) at once. Either way the driver decides every output folder and writes every file."""
    in_dir, out_dir = pathlib.Path(in_dir), pathlib.Path(out_dir)
    cluster.check_backend(backend, address)
    if not in_dir.is_dir():
        raise FgcompileError(f"{in_dir}: not a folder. Pass the folder that holds the .onnx models.")
    if jobs is not None and jobs < 1:
        raise SpecError(f"--jobs {jobs}: must be at least 1.")
    if not timeout > 0:
        raise SpecError(f"--timeout {timeout}: must be a positive number of seconds.")
    models = sorted(in_dir.glob("*.onnx"))
    if not models:
        raise FgcompileError(f"{in_dir}: holds no .onnx files.")
    with cluster.connected(address) if backend == "ray" else contextlib.nullcontext() as ray:   # before OUT is made
        return _batch(models, out_dir, spec, jobs, timeout, force, on_done, ray)


def _batch(models, out_dir, spec, jobs, timeout, force, on_done, ray) -> tuple[list[dict], bool]:
    _check_out(out_dir, models, force)
    plan = output_folders(models, out_dir)
    rows = []

    def finish(row):
        rows.append(row)
        if on_done:
            on_done(row)

    for model in models:
        if isinstance(plan[model], str):
            finish(_failed(model, time.monotonic(), plan[model]))
    pending = [m for m in models if not isinstance(plan[m], str)]
    if ray is not None:
        interrupted = _run_ray(ray, pending, plan, spec, force, jobs, timeout, finish, rows)
    else:
        interrupted = _run_local(pending, plan, spec, force, min(jobs or 2, len(models), os.cpu_count() or 1),
                                 timeout, finish, rows)
    _check_owners(rows, plan)
    rows.sort(key=lambda r: r["model"])
    modelio.save_json(out_dir / SUMMARY, rows)
    return rows, interrupted


def _timed_out(timeout: float) -> str:
    return f"stopped after the --timeout of {timeout:g} s. Raise --timeout or compile this model on its own to see " \
           "where it hangs."


def _run_local(pending, plan, spec, force, jobs, timeout, finish, rows) -> bool:
    """Compile `pending` in child processes, `jobs` at a time; True when Ctrl-C stopped them."""
    running = {}
    with tempfile.TemporaryDirectory(prefix="fgcompile-batch-") as scratch:
        try:
            while pending or running:
                while pending and len(running) < jobs:
                    model = pending.pop(0)
                    running[model] = _start(model, plan[model], spec, force, pathlib.Path(scratch))
                for model, (proc, t0, result) in list(running.items()):
                    if proc.poll() is None and time.monotonic() - t0 <= timeout:
                        continue
                    if proc.returncode is None:
                        _stop(proc)
                        row = _failed(model, t0, _timed_out(timeout))
                    else:
                        row = _row(model, proc, t0, result)
                    del running[model]
                    finish(row)
                _pause()
        except KeyboardInterrupt:
            for model, (proc, t0, _) in running.items():
                _stop(proc)
                rows.append(_failed(model, t0, "stopped by Ctrl-C before it finished.", status="cancelled"))
            return True
    return False


def _run_ray(ray, pending, plan, spec, force, jobs, timeout, finish, rows) -> bool:
    """Compile `pending` as Ray tasks, at most `jobs` (default: the cluster's CPUs) at a time; the driver
    writes each result as the local child would. True when Ctrl-C stopped them."""
    compile_task, jobs, running = cluster.task(_timed_compile), jobs or cluster.cpus(ray), {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                model = pending.pop(0)
                running[compile_task(str(model), spec)] = (model, time.monotonic())
            done, _ = ray.wait(list(running), num_returns=1, timeout=POLL)
            for ref in done:   # one that ended during the wait but past its deadline is a timeout, as a local child
                model, t0 = running.pop(ref)
                finish(_failed(model, t0, _timed_out(timeout)) if time.monotonic() - t0 > timeout
                       else _task_row(ray, ref, model, plan[model], force, t0))
            for ref, (model, t0) in list(running.items()):
                if time.monotonic() - t0 > timeout:
                    ray.cancel(ref, force=True)
                    del running[ref]
                    finish(_failed(model, t0, _timed_out(timeout)))
    except KeyboardInterrupt:
        for ref, (model, t0) in running.items():
            ray.cancel(ref, force=True)
            rows.append(_failed(model, t0, "stopped by Ctrl-C before it finished.", status="cancelled"))
        return True
    return False


def _timed_compile(path: str, spec: TrainSpec):
    """(seconds, compile_source's result): the Ray task of one model."""
    t0 = time.perf_counter()
    compiled = compile_source(path, spec)
    return time.perf_counter() - t0, compiled


def _task_row(ray, ref, model: pathlib.Path, out: pathlib.Path, force: bool, t0: float) -> dict:
    try:
        seconds, compiled = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:   # the task raised (Ray does not retry that): its own error
        return _failed(model, t0, _error_text(exc.cause if isinstance(exc.cause, Exception) else exc))
    except ray.exceptions.RayError as exc:   # its worker was lost more often than the task is retried
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return _failed(model, t0, f"its Ray task failed ({why}); a lost worker is retried {cluster.RETRIES} "
                                  "times (out of memory? a node lost?).")
    return written(str(model), compiled, out, force, time.perf_counter() - seconds)


def _check_owners(rows: list[dict], plan: dict) -> None:
    """An "ok" row's folder must hold its own model's output: the marker names the model it came from. (A
    case-insensitive output disk can still map two names to one folder.)"""
    by_name = {m.name: m for m in plan}
    for row in rows:
        model = by_name[row["model"]]
        if row["status"] == "ok" and folder.marker(plan[model]).get("source") != os.path.realpath(model):
            row.update(status="error", error=f"{plan[model]}: another model of this batch wrote the same folder "
                                             "(a case-insensitive disk?). Rename one of the two models.")


def _pause() -> None:
    time.sleep(POLL)


def _start(model: pathlib.Path, out: pathlib.Path, spec: TrainSpec, force: bool, scratch: pathlib.Path):
    result = scratch / f"{model.name}.json"
    with open(result.with_suffix(".err"), "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fgcompile.batch", str(model), str(out), json.dumps(dataclasses.asdict(spec)),
                                 "1" if force else "0", str(result)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    return proc, time.monotonic(), result


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _failed(model: pathlib.Path, t0: float, error: str, status: str = "error") -> dict:
    return {"model": model.name, "status": status, "trainable_params": None, "graph_bytes": None,
            "seconds": round(time.monotonic() - t0, 3), "error": error}


def _row(model: pathlib.Path, proc: subprocess.Popen, t0: float, result: pathlib.Path) -> dict:
    try:
        return json.loads(result.read_text())
    except (OSError, ValueError):
        pass
    rc = proc.returncode
    how = (f"was killed by signal {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals()
           else f"exited with status {rc}")
    try:
        last = result.with_suffix(".err").read_text(errors="replace").strip().splitlines()[-1:] or [""]
    except OSError:
        last = [""]
    return _failed(model, t0, f"the worker process {how} before reporting (out of memory? the system's OOM "
                              f"killer sends SIGKILL). {last[0][:200]}".rstrip())


def format_summary(rows: list[dict]) -> str:
    head = ("model", "status", "trainable", "graph", "time", "error")
    body = [(r["model"], r["status"], r["trainable_params"] or "-",
             f"{r['graph_bytes'] / 1024:.0f} KiB" if r["graph_bytes"] else "-", f"{r['seconds']:.2f}s",
             (r["error"] or "")[:90]) for r in rows]
    failed = sum(r["status"] == "error" for r in rows)
    cancelled = sum(r["status"] == "cancelled" for r in rows)
    total = f"{len(rows) - failed - cancelled} compiled, {failed} failed"
    total += f", {cancelled} cancelled" if cancelled else ""
    return "\n".join(format_table(head, body) + [total])


if __name__ == "__main__":  # one model, in its own process: python -m fgcompile.batch MODEL OUT SPEC FORCE RESULT
    model_path, out_path, spec_json, force_flag, result_path = sys.argv[1:6]
    row = compile_one(model_path, out_path, TrainSpec(**json.loads(spec_json)), force_flag == "1")
    modelio.write_bytes(result_path, json.dumps(row).encode())
