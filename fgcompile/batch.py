"""batch: compile every .onnx in a folder in parallel processes; one bad model never stops the rest."""
from __future__ import annotations

import concurrent.futures
import pathlib
import time

from fgcompile import modelio
from fgcompile.compiler import TRAIN, compile_model, write_compiled
from fgcompile.errors import FgcompileError
from fgcompile.spec import TrainSpec


def compile_one(path: str, out_dir: str, spec: TrainSpec) -> dict:
    t0 = time.perf_counter()
    row = {"model": pathlib.Path(path).name, "status": "ok", "trainable_params": None, "graph_bytes": None,
           "seconds": None, "error": None}
    try:
        source = modelio.load_model(path)
        compiled = compile_model(source, spec)
        dest = write_compiled(compiled, out_dir)
        row["trainable_params"] = int(sum(v.size for v in compiled.state.values()))
        row["graph_bytes"] = (dest / TRAIN).stat().st_size
    except FgcompileError as exc:
        row.update(status="error", error=str(exc))
    except Exception as exc:  # an unexpected failure in one model is reported, not raised
        row.update(status="error", error=f"internal error: {type(exc).__name__}: {exc}")
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def batch_compile(in_dir, out_dir, spec: TrainSpec, jobs: int = 2, on_done=None) -> list[dict]:
    in_dir, out_dir = pathlib.Path(in_dir), pathlib.Path(out_dir)
    if not in_dir.is_dir():
        raise FgcompileError(f"{in_dir}: not a folder. Pass the folder that holds the .onnx models.")
    models = sorted(in_dir.glob("*.onnx"))
    if not models:
        raise FgcompileError(f"{in_dir}: holds no .onnx files.")
    rows = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(compile_one, str(p), str(out_dir / p.stem), spec): p for p in models}
        for fut in concurrent.futures.as_completed(futures):
            rows.append(fut.result())
            if on_done:
                on_done(rows[-1])
    rows.sort(key=lambda r: r["model"])
    modelio.save_json(out_dir / "summary.json", rows)
    return rows


def format_summary(rows: list[dict]) -> str:
    head = ("model", "status", "trainable", "graph", "time", "error")
    body = [(r["model"], r["status"], r["trainable_params"] or "-",
             f"{r['graph_bytes'] / 1024:.0f} KiB" if r["graph_bytes"] else "-", f"{r['seconds']:.2f}s",
             (r["error"] or "")[:90]) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    failed = sum(r["status"] != "ok" for r in rows)
    return "\n".join([line(head)] + [line(b) for b in body] + [f"{len(rows) - failed} compiled, {failed} failed"])
