"""Fuzz `fgcompile batch`: a seeded generator fills an input folder with a random mix of models under
colliding and odd names, symlink loops, dangling symlinks, folders named *.onnx, FIFOs, corrupt and
unreadable models, and sometimes an output folder the user already holds files in.

Every case must exit 0, 1 or 2 without a traceback, give one summary row per input, change nothing outside
its output (nor the user's files inside it), and every "ok" row's folder must hold a train.onnx that loads
in onnxruntime, compiled from THAT input. FGCOMPILE_FUZZ_SEED picks another run (the default suite uses
seed 0), as in test_fuzz_inputs.py.
"""
import json
import os
import pathlib
import shutil
import stat

import onnx
import pytest
from click.testing import CliRunner

from conftest import MODELS
from fgcompile import folder
from fgcompile.batch import folder_name
from fgcompile.cli import main
from fgcompile.session import make_session
from test_fuzz_inputs import BYTE_MUTATORS, SEED, cases

SMALL = [MODELS / "digits_cnn" / "w8a8.onnx", MODELS / "digits_attn" / "w8a8.onnx"]
NAMES = ["a.onnx", "a_model.onnx", "summary.json.onnx", "summary.json_model.onnx", "..onnx", "...onnx", ".onnx",
         "A.onnx", "b c.onnx", "ü.onnx", "summary.onnx", "-o.onnx"]


def model(path, rng):
    shutil.copy(SMALL[rng.integers(len(SMALL))], path)


def corrupt(path, rng):
    path.write_bytes(BYTE_MUTATORS[rng.integers(len(BYTE_MUTATORS))](SMALL[0].read_bytes(), rng))


def unreadable(path, rng):
    model(path, rng)
    path.chmod(0)   # root reads it anyway: then it compiles


def loop(path, rng):
    if rng.random() < 0.5:
        path.symlink_to(path.name)
    else:   # a two-link cycle through a second name that is not an input
        path.symlink_to(path.name + ".other")
        path.with_name(path.name + ".other").symlink_to(path.name)


def dangling(path, rng):
    path.symlink_to("nowhere.onnx")


def alias(path, rng):
    """A symlink to another model of the folder (a second name for one file)."""
    target = path.with_name(f"target{rng.integers(100)}.onnx")
    if not os.path.lexists(target):
        model(target, rng)
    path.symlink_to(target.name)


def folder_named(path, rng):
    path.mkdir()
    if rng.random() < 0.5:
        model(path / "inside.onnx", rng)


def fifo(path, rng):
    os.mkfifo(path)


ENTRIES = [model, model, model, corrupt, unreadable, loop, dangling, alias, folder_named, fifo]


def user_output(out, rng, names):
    """What the user may already hold in -o: their own files, a folder named like a model's output, or a
    symlink that makes two output names one folder."""
    out.mkdir()
    (out / "notes.txt").write_text("the user's work")
    roll = rng.random()
    if roll < 0.3:
        (out / "summary.json").write_text("[1, 2]")                     # not a summary batch wrote: exit 2
    elif roll < 0.6 and names:
        mine = out / pathlib.Path(names[rng.integers(len(names))]).stem
        if mine.name not in ("", ".", ".."):
            mine.mkdir(exist_ok=True)
            (mine / "data.csv").write_text("1,2\n")                      # that model's row fails
    elif len(names) > 1:
        first, second = (pathlib.Path(n).stem for n in names[:2])
        if {first, second}.isdisjoint({"", ".", ".."}) and first != second:
            (out / first).symlink_to(second)                            # two names, one folder


def tree(root):
    """Every entry under root without following symlinks or opening FIFOs: file bytes, link targets, kinds."""
    seen = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            key = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                seen[key] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    seen[key] = ("file", f.read(), stat.S_IMODE(st.st_mode))
            else:
                seen[key] = ("dir" if stat.S_ISDIR(st.st_mode) else "special", stat.S_IFMT(st.st_mode))
    return seen


def build(tmp_path, rng):
    src = tmp_path / "in"
    src.mkdir()
    (src / "README.txt").write_text("not an input")
    names = list(rng.choice(NAMES, size=int(rng.integers(2, 5)), replace=False))
    for name in names:
        ENTRIES[rng.integers(len(ENTRIES))](src / name, rng)
    if rng.random() < 0.5:
        user_output(tmp_path / "out", rng, names)
    return src, tmp_path / "out"


@pytest.mark.parametrize("i,rng", cases(3, 5), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_mutated_batch_folders(tmp_path, i, rng):
    src, out = build(tmp_path, rng)
    label = f"seed {SEED} case {i}: {sorted(os.listdir(src))}, out {sorted(os.listdir(out)) if out.exists() else '-'}"
    before = tree(tmp_path)
    r = CliRunner().invoke(main, ["batch", str(src), "-o", str(out), "--m", "1", "--jobs", "2"])
    assert r.exit_code in (0, 1, 2), f"{label}: exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), \
        f"{label}: {r.output}\n{r.exception!r}"
    after = tree(tmp_path)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    if r.exit_code == 2:
        assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, f"{label}: {r.output}"
        assert not changed, f"{label}: a refused batch changed {sorted(changed)}"
        return
    inside = {k for k in changed if k.startswith("out" + os.sep) or k == "out"}
    assert not changed - inside, f"{label}: changed outside the output: {sorted(changed - inside)}"
    mine = sorted(k for k in inside if k in before)
    assert not mine, f"{label}: changed the user's {mine}"
    rows = json.loads((out / "summary.json").read_text())
    inputs = sorted(p.name for p in src.glob("*.onnx"))
    assert [row["model"] for row in rows] == inputs, label
    folders = set()
    for row in rows:
        if row["status"] != "ok":
            assert row["error"] and "internal error" not in row["error"], f"{label}: {row}"
            continue
        dest = out / folder_name(pathlib.Path(row["model"]))
        real = os.path.realpath(dest)
        assert real not in folders, f"{label}: two ok rows share {dest}"
        folders.add(real)
        assert folder.marker(dest).get("source") == os.path.realpath(src / row["model"]), f"{label}: {row}"
        assert (dest / "train.onnx").stat().st_size == row["graph_bytes"], f"{label}: {row}"
        ops = [[n.op_type for n in onnx.load(str(p)).graph.node] for p in (src / row["model"], dest / "source.onnx")]
        assert ops[0] == ops[1], f"{label}: {row}"   # the shipped models are canonical: source.onnx is the input
        make_session(str(dest / "train.onnx"))
    assert (r.exit_code == 0) == all(row["status"] == "ok" for row in rows), label

