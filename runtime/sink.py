"""sink: a run's records in its compiled folder, and reading them back (resume, the latest state).

    OUT/checkpoint.npz    the TrainState, the sums of its epoch's metrics so far, the spec, the Plan and the
                          train.onnx it belongs to (runtime/checkpoint.py): every `every` steps and at the end
    OUT/train_log.jsonl   one JSON line per finished epoch, appended whole or not at all
A run starts (`begin`) by continuing the checkpoint (resume: the same Plan, else refused; the log is cut
back to its step) or by removing both (a new run); a folder that holds a checkpoint is never trained
over without resume or restart. The caller holds the folder's lock (fgcompile/folder.py).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib

from fgcompile import folder, modelio, validate
from fgcompile.artifact import LAYOUT, Contract
from fgcompile.errors import OutputError, SpecError
from . import checkpoint
from .loop import Plan
from .program import Program, open_train_graph
from .state import TrainState

# run settings a bit-identical resume needs unchanged (epochs only matters to the cosine schedule)
RESUME_KEYS = ("batch", "examples", "data_sha256", "schedule", "epochs", "lr_numerator")


class FolderSink:
    """Receives a run's epochs and states (runtime/loop.py) and writes them into OUT."""

    def __init__(self, out: pathlib.Path, program: Program, plan: Plan, every: int):
        self.out, self.program, self.plan, self.every = out, program, plan, every

    def epoch(self, record: dict) -> None:
        _append_line(self.out / LAYOUT.log, json.dumps(record))

    def stepped(self, state: TrainState, sums: dict) -> None:
        if state.step % self.every == 0 or state.step == self.plan.total:
            self.save(state, sums)

    def save(self, state: TrainState, sums: dict) -> None:
        meta = {"step": state.step, "bad_steps": state.bad_steps, "epoch_sums": sums,
                "spec": dataclasses.asdict(self.program.spec), "run": dataclasses.asdict(self.plan),
                "train_sha256": self.program.train_sha256}
        checkpoint.save(self.out / LAYOUT.checkpoint, dict(state.tensors), meta)


def check_files(out: pathlib.Path) -> None:
    """OutputError unless the checkpoint and the log are regular files or absent (before anything is read)."""
    for name in (LAYOUT.checkpoint, LAYOUT.log):
        if os.path.lexists(out / name) and not (out / name).is_file():
            raise OutputError(f"{out / name}: is not a regular file (a folder or special file); "
                              f"train writes its {name} there. Move it away.")


def begin(out: pathlib.Path, program: Program, plan: Plan, resume: bool, restart: bool,
          allow_changed_run: bool) -> tuple[TrainState | None, dict | None, list[str]]:
    """(the checkpoint's state, its epoch sums, notes) when resuming one, else (None, None, []) after
    removing the checkpoint and the log. OutputError when a checkpoint exists and neither resume nor
    restart was asked for; SpecError when a resume's Plan differs (unless allowed)."""
    has_checkpoint = (out / LAYOUT.checkpoint).exists()
    if has_checkpoint and not (resume or restart):
        _, meta = checkpoint.load(out / LAYOUT.checkpoint, program.contract, program.train_sha256)
        raise OutputError(f"{out}: already holds a trained checkpoint (step {meta['step']}); training "
                          "from the start would discard it. Pass --resume to continue it, or --restart to "
                          "start over (the checkpoint and train_log.jsonl are replaced).")
    if not (resume and has_checkpoint):
        (out / LAYOUT.log).unlink(missing_ok=True)
        (out / LAYOUT.checkpoint).unlink(missing_ok=True)
        return None, None, []
    tensors, meta = checkpoint.load(out / LAYOUT.checkpoint, program.contract, program.train_sha256)
    notes = _check_run(meta.get("run"), dataclasses.asdict(plan), allow_changed_run)
    _truncate_log(out / LAYOUT.log, meta["step"])
    return TrainState(tensors, meta["step"], meta.get("bad_steps", 0)), meta.get("epoch_sums"), notes


def latest_state(out_dir, contract: Contract | None = None) -> dict:
    """The newest state of a compiled folder, checked against its contract: its checkpoint if training
    ran, else the initial state."""
    out = pathlib.Path(out_dir)
    folder.recover(out)
    sha = None
    if contract is None:
        _, contract, sha = open_train_graph(out)
    elif (out / LAYOUT.train).is_file():
        sha = validate.file_sha256(out / LAYOUT.train)
    path = out / LAYOUT.checkpoint if (out / LAYOUT.checkpoint).exists() else out / LAYOUT.state
    return checkpoint.load(path, contract, sha)[0]


def _check_run(before: dict | None, now: dict, allow: bool) -> list[str]:
    """A resume replays steps bit for bit only with the same batch, data and schedule (and, for the
    cosine schedule, epochs). Say what changed; refuse unless allowed."""
    if not before:
        return []
    changed = {k: (before.get(k), now[k]) for k in RESUME_KEYS if k in before and before[k] != now[k]}
    shown = ", ".join(f"{k} {'changed' if k == 'data_sha256' else f'{a} -> {b}'}" for k, (a, b) in changed.items())
    breaking = [k for k in changed if k != "epochs" or now["schedule"] == "cosine"]
    if breaking and not allow:
        raise SpecError(f"--resume: the run differs from the checkpoint's ({shown}), so the resumed steps "
                        "would not match an uninterrupted run. Pass the original --data/--batch/--epochs/"
                        "--schedule/--lr, --restart to start over, or --allow-changed-run to continue anyway.")
    return [f"resuming with a changed run: {shown}"] if changed else []


def _append_line(path: pathlib.Path, line: str) -> None:
    """Append one line whole or not at all: a write the disk cut short is cut back off."""
    data = f"{line}\n".encode()
    with open(path, "ab", buffering=0) as f:
        start = f.tell()
        try:
            if f.write(data) != len(data):   # a short write: the disk filled mid-line
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        except OSError as exc:
            f.truncate(start)
            if exc.errno in modelio.NO_SPACE:
                raise modelio.no_space(path, len(data)) from None
            raise


def _truncate_log(path: pathlib.Path, step: int) -> None:
    """Keep the log records up to `step` (those after it will be replayed), and drop a torn last line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    modelio.write_bytes(path, "".join(f"{line}\n" for line in kept).encode())
