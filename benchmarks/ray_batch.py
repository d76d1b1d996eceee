"""`fgcompile batch --backend ray` on a folder of 40+ real models: the local backend's folders and summary byte for
byte, also when a Ray worker is killed mid-run, and the wall time of each.

    python benchmarks/ray_batch.py [--cpus 2] [--out benchmarks/results/ray-batch.json]     (needs the ray extra)

The folder (symlinks in a temporary folder) holds every distinct quantized model the repo ships or its recipes
build offline, 41 in all, each file distinct (no renamed copies):
    shipped   models/{digits_cnn,digits_attn,kws_dscnn,kws_detect}/{w8a8,w16a8}.onnx (8), models/tflite/*.onnx (2),
              tests/data/*.onnx (1)
    dialects  models/recipes/build_dialects.py: digits_cnn and digits_attn in 10 quantizer dialects (20), built
              here (~2 s)
    bench     models/recipes/build_bench.py: resnet18, mobilenetv2, dscnn, vit, resnet50 in w8a8 and w16a8 (10),
              read from its cache (~/.cache/fgcompile-bench), built there first when missing (~20 s)
Three runs of `fgcompile batch FOLDER -o OUT` (the command's own code, in this process), default options:
    local     the default backend: 2 child processes
    ray       --backend ray on a local Ray instance of --cpus CPUs started beforehand (its start is timed on its
              own), or on RAY_ADDRESS's cluster, which must share this host's files (the killer needs its workers here)
    ray+kill  the same, with one Ray worker killed by SIGKILL while it compiles a model, once a third of the
              models have started; Ray must rerun that model
Each Ray run's files are compared byte for byte with the local run's, its summary.json row by row without the
times (as tests/distributed/test_ray_backend.py does). A hook in every Ray worker (runtime_env's
worker_process_setup_hook) logs each compile attempt's start and end; a model attempted twice was retried, and the
log tells the killer which worker is compiling.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
import pathlib
import signal
import sys
import threading
import time

import onnx
from click.testing import CliRunner

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "models" / "recipes"))

import build_bench  # noqa: E402
import build_dialects  # noqa: E402
from fgcompile import models, modelio  # noqa: E402
from fgcompile.cli import main as fgcompile_cli  # noqa: E402
from run import machine  # noqa: E402

MIN_MODELS = 40          # the folder size
ATTEMPTS = "FGCOMPILE_BENCH_ATTEMPTS"   # the workers' attempt log (its env var)


def assemble(work: pathlib.Path) -> dict[str, str]:
    """{model file in work/models: where it came from}: symlinks to the models the module lists (the dialects
    built into work/dialects). Refuses duplicates: two equal files would count one model twice."""
    sources = {f"{p.parent.name}_{p.name}": p for p in sorted(models.ROOT.glob("*/w*a8.onnx"))}
    sources |= {f"tflite_{p.name}": p for p in sorted(models.ROOT.glob("tflite/*.onnx"))}
    sources |= {p.name: p for p in sorted((ROOT / "tests" / "data").glob("*.onnx"))}
    logging.getLogger().setLevel(logging.ERROR)   # quantize_static's advice to pre-process, once per model
    (work / "dialects").mkdir(parents=True)
    for arch in build_dialects.ARCHS:
        for dialect in build_dialects.DIALECTS:
            path = work / "dialects" / f"{arch}_{dialect}.onnx"
            onnx.save(build_dialects.build(arch, dialect), str(path))
            sources[f"dialect_{path.name}"] = path
    for name in build_bench.BUILDS:
        variants = [build_bench.CACHE / name / f"{v}.onnx" for v in ("w8a8", "w16a8")]
        if not all(p.exists() for p in variants):
            build_bench.build(name, build_bench.CACHE)
        sources |= {f"bench_{name}_{p.name}": p for p in variants}
    digests = collections.Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in sources.values())
    if max(digests.values()) > 1:
        raise SystemExit(f"{sum(n - 1 for n in digests.values())} of the {len(sources)} models are byte-equal copies "
                         "of another; the folder would count them twice.")
    (work / "models").mkdir()
    for name, path in sources.items():
        (work / "models" / name).symlink_to(path.resolve())
    return {name: str(path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path)
            for name, path in sources.items()}


def tree(folder: pathlib.Path) -> dict:
    """{relative path: sha256} of every file but the summary, whose times differ."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "summary.json"}


def summary(folder: pathlib.Path) -> list:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in json.loads((folder / "summary.json").read_text())]


def differences(local: pathlib.Path, other: pathlib.Path) -> list[str]:
    """What differs between two batch outputs: files (missing, extra or other bytes) and summary rows."""
    a, b = tree(local), tree(other)
    diff = [f"{path}: {'missing' if path not in b else 'extra' if path not in a else 'other bytes'}"
            for path in sorted(a.keys() | b.keys()) if a.get(path) != b.get(path)]
    rows_a, rows_b = summary(local), summary(other)
    diff += [f"summary.json: {x} != {y}" for x, y in zip(rows_a, rows_b) if x != y]
    diff += [f"summary.json: {len(rows_a)} rows != {len(rows_b)}"] if len(rows_a) != len(rows_b) else []
    return diff


def batch(folder: pathlib.Path, out: pathlib.Path, *backend: str) -> tuple[float, int]:
    """(wall seconds, exit code) of `fgcompile batch FOLDER -o OUT [backend options]` in this process."""
    t0 = time.perf_counter()
    r = CliRunner().invoke(fgcompile_cli, ["batch", str(folder), "-o", str(out), *backend])
    seconds = time.perf_counter() - t0
    if r.exit_code not in (0, 1) or "Traceback" in r.output:   # 1: some model failed, a row of the summary
        raise RuntimeError(f"fgcompile batch {' '.join(backend)} exited {r.exit_code}:\n{r.output}")
    return seconds, r.exit_code


def _log_attempts():
    """Every Ray worker's setup: log each compile attempt's start and end ("start|end PID MODEL") to the file
    that ATTEMPTS names. (Pickled by value; it refers to nothing else of this module.)"""
    import os
    from fgcompile import batch

    log, compile_source = os.environ["FGCOMPILE_BENCH_ATTEMPTS"], batch.compile_source

    def write(line):
        with open(log, "a") as f:   # O_APPEND: one short line at a time, whole
            f.write(line)

    def logged(path, spec):
        write(f"start {os.getpid()} {path}\n")
        result = compile_source(path, spec)
        write(f"end {os.getpid()} {path}\n")
        return result
    batch.compile_source = logged


def attempts(log: pathlib.Path) -> list[tuple[str, int, str]]:
    """[(start|end, pid, model)] in the order the workers wrote them."""
    if not log.exists():
        return []
    return [(kind, int(pid), model) for kind, pid, model in
            (line.split(" ", 2) for line in log.read_text().splitlines())]


def retried(log: pathlib.Path) -> dict[str, int]:
    """{model: its compile attempts beyond the first}, for the models attempted more than once."""
    started = collections.Counter(pathlib.Path(model).name for kind, _, model in attempts(log) if kind == "start")
    return {model: n - 1 for model, n in sorted(started.items()) if n > 1}


class Killer(threading.Thread):
    """Once `after` compile attempts have started, SIGKILL the Ray worker of the newest attempt still running:
    one not ended in the log whose process still bears Ray's title of a running batch task."""

    def __init__(self, log: pathlib.Path, after: int):
        super().__init__(daemon=True)
        self.log, self.after, self.stop, self.killed = log, after, threading.Event(), None

    def run(self):
        while not self.stop.is_set() and self.killed is None:
            log = attempts(self.log)
            ended = {(pid, model) for kind, pid, model in log if kind == "end"}
            running = [(pid, model) for kind, pid, model in log if kind == "start" and (pid, model) not in ended]
            if sum(kind == "start" for kind, _, _ in log) >= self.after:
                for pid, model in reversed(running):
                    if _compiling(pid):
                        os.kill(pid, signal.SIGKILL)
                        self.killed = {"pid": pid, "model": pathlib.Path(model).name,
                                       "attempts_started": sum(kind == "start" for kind, _, _ in log)}
                        return
            time.sleep(0.01)


def _compiling(pid: int) -> bool:
    """True when pid is a Ray worker running a batch task (Ray titles it after the task's function)."""
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::_in_folder")
    except OSError:
        return False


def measure(folder: pathlib.Path, work: pathlib.Path, cpus: int = 2, address: str | None = None) -> dict:
    """Batch FOLDER locally, on Ray, and on Ray with a worker killed (module docstring); outputs in work/."""
    import ray
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this process; the benchmark starts its own (with the "
                           "attempt-logging hook). Call ray.shutdown() first.")
    n = len(list(folder.glob("*.onnx")))
    local_s, local_code = batch(folder, work / "local")
    address = address or os.environ.get("RAY_ADDRESS") or None
    log = work / "attempts.log"
    if __name__ != "__main__":   # imported (the slow test): the workers cannot import this script by name
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    env = {k: v for k, v in os.environ.items() if k.startswith("FGCOMPILE_")} | {ATTEMPTS: str(log)}
    t0 = time.perf_counter()
    ray.init(address=address or "local", num_cpus=None if address else cpus, log_to_driver=False,
             logging_level="ERROR", runtime_env={"env_vars": env, "worker_process_setup_hook": _log_attempts})
    start_s = time.perf_counter() - t0
    try:
        workers = int(ray.cluster_resources().get("CPU", 0))
        ray_s, ray_code = batch(folder, work / "ray", "--backend", "ray")
        ray_retried = retried(log)
        log.unlink()
        killer = Killer(log, after=n // 3)
        killer.start()
        try:
            kill_s, kill_code = batch(folder, work / "ray_kill", "--backend", "ray")
        finally:
            killer.stop.set()
            killer.join()
        kill_retried = retried(log)
    finally:
        ray.shutdown()
    rows = json.loads((work / "local" / "summary.json").read_text())
    files = tree(work / "local")
    diff, kill_diff = differences(work / "local", work / "ray"), differences(work / "local", work / "ray_kill")
    return {"machine": machine(), "models": n, "cluster": address or f"local Ray instance, {cpus} CPUs",
            "ray_cpus": workers, "statuses": dict(collections.Counter(r["status"] for r in rows)),
            "failed": {r["model"]: r["error"] for r in rows if r["status"] != "ok"},
            "files": len(files), "bytes": sum((work / "local" / p).stat().st_size for p in files),
            "local_s": round(local_s, 2), "ray_s": round(ray_s, 2), "ray_kill_s": round(kill_s, 2),
            "ray_start_s": round(start_s, 2), "exit_codes": {"local": local_code, "ray": ray_code, "ray_kill": kill_code},
            "identical": not diff and ray_code == local_code, "kill_identical": not kill_diff and kill_code == local_code,
            "differences": diff, "kill_differences": kill_diff,
            "killed": killer.killed, "retried": {"ray": ray_retried, "ray_kill": kill_retried},
            "retries": {"ray": sum(ray_retried.values()), "ray_kill": sum(kill_retried.values())}}


def markdown(r: dict) -> str:
    mc, yes = r["machine"], lambda ok: "yes" if ok else "**no**"
    killed = r["killed"]
    statuses = ", ".join(f"{v} {k}" for k, v in sorted(r["statuses"].items()))
    lines = [
        f"# `fgcompile batch --backend ray` on a folder of {r['models']} models", "",
        f"Machine: {mc['cpu']}, {mc['cores']} cores (shared with other jobs); "
        + ", ".join(f"{k} {v}" for k, v in mc["packages"].items() if v)
        + f"; fgcompile at {mc['commit']} ({mc['date']}). Ray: {r['cluster']} ({r['ray_cpus']} CPUs), started "
        f"beforehand in {r['ray_start_s']:.1f} s (not in the rows). Protocol: benchmarks/ray_batch.py.", "",
        "| models | local wall s | ray wall s | ray / local | identical | ray+kill wall s | kill run identical | "
        "retries seen (ray, ray+kill) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['models']} | {r['local_s']:.1f} | {r['ray_s']:.1f} | {r['ray_s'] / r['local_s']:.2f} | "
        f"{yes(r['identical'])} | {r['ray_kill_s']:.1f} | {yes(r['kill_identical'])} | {r['retries']['ray']}, "
        f"{r['retries']['ray_kill']} |", "",
        f"Local summary: {statuses}; {r['files']} files, {r['bytes'] / 2**20:.1f} MiB compared byte for byte (the "
        "summary without its times). "
        + (f"Killed: worker pid {killed['pid']} (SIGKILL) while it compiled {killed['model']}, after "
           f"{killed['attempts_started']} of the models' compiles had started; Ray reran "
           f"{', '.join(r['retried']['ray_kill']) or 'nothing'}." if killed else "**No worker was killed** (none was "
                                                                              "seen compiling on this host)."), ""]
    lines += [f"- {model}: {error}" for model, error in sorted(r["failed"].items())]
    lines += [f"- differs (ray): {d}" for d in r["differences"][:20]]
    lines += [f"- differs (ray+kill): {d}" for d in r["kill_differences"][:20]]
    return "\n".join(lines).rstrip() + "\n"


def main():
    import tempfile
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance (not with RAY_ADDRESS)")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "ray-batch.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ray-batch-") as tmp:
        sources = assemble(pathlib.Path(tmp))
        if len(sources) < MIN_MODELS:
            print(f"only {len(sources)} distinct models (the issue asks for {MIN_MODELS})", file=sys.stderr)
        result = measure(pathlib.Path(tmp) / "models", pathlib.Path(tmp), cpus=args.cpus) | {"sources": sources}
    modelio.save_json(args.out, result)
    text = markdown(result)
    modelio.write_bytes(args.out.with_suffix(".md"), text.encode())
    print(text)


if __name__ == "__main__":
    main()
