"""Fuzz: a seeded mutator edits the shipped models, a compiled folder's files, checkpoints and .npz data
(byte flips, truncation, dtype/shape/metadata edits), and writes --config files (values of every TOML type
for the commands' options, unknown keys and tables, deep nesting, binary garbage, a FIFO, a folder or
/dev/zero as the file), and values of --freeze, --false-alarm and export's --force, and runs the CLI on each
in-process (batch folders: test_fuzz_batch.py).

Every case must exit 0 or 2 without a traceback, change no file outside its output, and any output it
writes must load in onnxruntime. FGCOMPILE_FUZZ_SEED picks another run (the default suite uses seed 0).
"""
import io
import json
import os
import shutil
import threading

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import MODELS
from fgcompile import config
from fgcompile.cli import main
from fgcompile.runtime import checkpoint
from fgcompile.session import make_session

SEED = int(os.environ.get("FGCOMPILE_FUZZ_SEED", "0"))
SHIPPED = [MODELS / "digits_cnn" / "w8a8.onnx", MODELS / "digits_cnn" / "w16a8.onnx",
           MODELS / "digits_attn" / "w8a8.onnx"]
DTYPES = [np.float16, np.float64, np.int8, np.uint8, np.int16, np.int32, np.int64, np.bool_, np.complex64]


# ------------------------------------------------------------------------------------------------- mutators
def flip_bytes(raw: bytes, rng) -> bytes:
    b = bytearray(raw)
    for i in rng.integers(0, len(b), rng.integers(1, 9)):
        b[i] ^= int(rng.integers(1, 256))
    return bytes(b)


def truncate(raw: bytes, rng) -> bytes:
    return raw[:int(rng.integers(0, len(raw)))]


def splice(raw: bytes, rng) -> bytes:
    i, j = sorted(rng.integers(0, len(raw), 2))
    return raw[:i] + (raw[j:i + 2 * (j - i)] if rng.random() < 0.5 else b"") + raw[j:]


BYTE_MUTATORS = [flip_bytes, truncate, splice]


def edit_array(a: np.ndarray, rng) -> np.ndarray:
    kind = rng.integers(0, 7)
    if kind == 0:
        return a.astype(DTYPES[rng.integers(len(DTYPES))])
    if kind == 1 and a.ndim:
        return a.reshape(-1) if a.ndim > 1 else a.reshape(1, -1)
    if kind == 2 and a.ndim and a.shape[0] > 1:
        return a[: int(rng.integers(0, a.shape[0]))]
    if kind == 3:
        return np.asarray(a.reshape(-1)[0] if a.size else 0)       # 0-d
    if kind == 4 and a.size:
        b = a.astype(np.float64) if not np.issubdtype(a.dtype, np.integer) else a.copy()
        b.reshape(-1)[rng.integers(0, b.size)] = [np.nan, np.inf, -1, 10 ** 6, -(10 ** 9)][rng.integers(5)] \
            if b.dtype.kind == "f" else np.iinfo(b.dtype).max
        return b
    if kind == 5 and a.ndim:
        return np.swapaxes(a, 0, -1)
    return np.zeros((0,) + a.shape[1:], a.dtype)


def npz_bytes(arrays: dict, rng) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if rng.random() < 0.5 else np.savez)(buf, **arrays)
    return buf.getvalue()


def mutate_npz(raw: bytes, rng) -> bytes:
    """Edit the arrays (dtype, shape, values, keys) or the bytes of an .npz."""
    if rng.random() < 0.35:
        return BYTE_MUTATORS[rng.integers(3)](raw, rng)
    with np.load(io.BytesIO(raw)) as f:
        arrays = {k: f[k] for k in f.files}
    keys = sorted(arrays)
    key = keys[rng.integers(len(keys))]
    roll = rng.random()
    if roll < 0.1:
        del arrays[key]
    elif roll < 0.15:
        arrays["extra"] = np.zeros(3)
    elif key == "__meta__":
        meta = json.loads(str(arrays[key]))
        field = ["step", "train_sha256", "run", "bad_steps"][rng.integers(4)]
        meta[field] = [-5, "x", None, 2 ** 40, {"batch": 0}, [1]][rng.integers(6)]
        arrays[key] = np.array(json.dumps(meta))
    else:
        arrays[key] = edit_array(arrays[key], rng)
    return npz_bytes(arrays, rng)


def mutate_model(raw: bytes, rng) -> bytes:
    """Edit an ONNX model's structure (initializer dtype/shape, attributes, opset, inputs, metadata) or bytes."""
    if rng.random() < 0.4:
        return BYTE_MUTATORS[rng.integers(3)](raw, rng)
    m = onnx.load_from_string(raw)
    kind = rng.integers(0, 7)
    inits = list(m.graph.initializer)
    if kind == 0 and inits:
        t = inits[rng.integers(len(inits))]
        t.data_type = int(rng.choice([1, 2, 3, 5, 6, 7, 10, 11]))
    elif kind == 1 and inits:
        t = inits[rng.integers(len(inits))]
        if t.dims:
            t.dims[rng.integers(len(t.dims))] = int(rng.integers(0, 70))
    elif kind == 2 and inits:
        m.graph.initializer.remove(inits[rng.integers(len(inits))])
    elif kind == 3:
        nodes = [n for n in m.graph.node if n.attribute]
        if nodes:
            a = nodes[rng.integers(len(nodes))].attribute[0]
            if a.type == onnx.AttributeProto.INT:
                a.i = int(rng.integers(-4, 5))
    elif kind == 4:
        m.opset_import[0].version = int(rng.integers(1, 30))
    elif kind == 5:
        m.graph.input[0].type.tensor_type.elem_type = int(rng.choice([2, 6, 7, 10, 11]))
    else:
        props = [p for p in m.metadata_props if p.key == "fgcompile"]
        if props:
            props[0].value = mutate_contract(props[0].value, rng)
        else:
            m.graph.node.remove(m.graph.node[rng.integers(len(m.graph.node))])
    return m.SerializeToString()


def mutate_contract(text: str, rng) -> str:
    c = json.loads(text)
    roll = rng.random()
    junk = [None, -1, 0, 2 ** 40, "int8", [3], {}, True, 1.5][rng.integers(9)]
    if roll < 0.2:
        c.pop(sorted(c)[rng.integers(len(c))])
    elif roll < 0.7 and c.get("state"):
        k = int(rng.integers(len(c["state"])))
        if isinstance(c["state"][k], dict):      # train.onnx: one object per tensor
            c["state"][k][sorted(c["state"][k])[rng.integers(len(c["state"][k]))]] = junk
        else:                                    # eval.onnx: the state input names
            c["state"][k] = junk
    elif roll < 0.85:
        key = ["spec", "inputs", "lr_numerator", "outputs"][rng.integers(4)]
        if isinstance(c.get(key), dict) and c[key]:
            c[key][sorted(c[key])[rng.integers(len(c[key]))]] = junk
    else:
        return text[: int(rng.integers(0, len(text)))]
    return json.dumps(c)


# ------------------------------------------------------------------------------------------------- harness
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Small data and, per shipped model, a compiled folder with a short training run behind it."""
    root = tmp_path_factory.mktemp("fuzzbase")
    d = np.load(MODELS / "data" / "digits_target_train.npz")
    np.savez(root / "data.npz", x=d["x"][:64], y=d["y"][:64])
    for i, model in enumerate(SHIPPED):
        out = root / f"c{i}"
        assert CliRunner().invoke(main, ["compile", str(model), "-o", str(out), "--m", "1"]).exit_code == 0
        r = CliRunner().invoke(main, ["train", str(out), "--data", str(root / "data.npz"), "--epochs", "1", "--quiet"])
        assert r.exit_code == 0, r.output
    return root


def files_under(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".fgcompile.lock"}


def run_case(work, args, outputs, label):
    """Run one CLI case in `work`; check exit status, traceback, untouched inputs and loadable outputs."""
    before = files_under(work)
    label = f"{label}, fgcompile {args[0]}"
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code in (0, 2), f"{label}: exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), \
        f"{label}: {r.output}\n{r.exception!r}"
    if r.exit_code == 2:
        usage = r.stderr.startswith("Usage: ") and "\nError: " in r.stderr   # click's own refusal of a flag's value
        assert usage or r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, f"{label}: {r.output}"
        assert not r.stdout or set(json.loads(r.stdout)) == {"error", "kind"}, f"{label}: {r.output}"   # --json
    after = files_under(work)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert all(any(k == o or k.startswith(o + os.sep) for o in outputs) for k in changed), \
        f"{label}: changed files outside the output: {sorted(changed)}"
    if r.exit_code == 0:
        for o in outputs:
            for p in ([work / o] if (work / o).is_file() else sorted((work / o).glob("*.onnx"))):
                if p.suffix == ".onnx":
                    make_session(str(p))
    return r


def cases(category: int, n: int):
    return [(i, np.random.default_rng([SEED, category, i])) for i in range(n)]


@pytest.mark.parametrize("i,rng", cases(0, 60), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_mutated_models(tmp_path, base, i, rng):
    source = SHIPPED[rng.integers(len(SHIPPED))]
    model = tmp_path / "m.onnx"
    model.write_bytes(mutate_model(source.read_bytes(), rng))
    shutil.copy(base / "data.npz", tmp_path / "data.npz")
    label = f"seed {SEED} case {i}: mutated {source.name}"
    run_case(tmp_path, ["compile", model, "-o", tmp_path / "out", "--m", "1"], ["out"], label)
    run_case(tmp_path, ["inspect", model], [], label)
    run_case(tmp_path, ["eval", model, "--data", tmp_path / "data.npz"], [], label)


FOLDER_FILES = ["train.onnx", "eval.onnx", "source.onnx", "state.npz", "checkpoint.npz", ".fgcompile-folder"]


@pytest.mark.parametrize("i,rng", cases(1, 80), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_mutated_compiled_folders(tmp_path, base, i, rng):
    src = base / f"c{rng.integers(len(SHIPPED))}"
    out = tmp_path / "out"
    shutil.copytree(src, out)
    name = FOLDER_FILES[rng.integers(len(FOLDER_FILES))]
    raw = (out / name).read_bytes()
    mutate = mutate_model if name.endswith(".onnx") else mutate_npz if name.endswith(".npz") else flip_bytes
    (out / name).write_bytes(mutate(raw, rng))
    shutil.copy(base / "data.npz", tmp_path / "data.npz")
    label = f"seed {SEED} case {i}: {src.name}/{name} mutated"
    run_case(tmp_path, ["export", out, "-o", tmp_path / "adapted.onnx"], ["adapted.onnx"], label)
    run_case(tmp_path, ["eval", out, "--data", tmp_path / "data.npz"], [], label)
    if i % 4 == 0:
        logs = [f"out{os.sep}checkpoint.npz", f"out{os.sep}train_log.jsonl"]
        r = run_case(tmp_path, ["train", out, "--data", tmp_path / "data.npz", "--epochs", "2", "--resume", "--quiet",
                                "--allow-changed-run"], logs, label)
        if r.exit_code == 0:
            checkpoint.load(out / "checkpoint.npz")   # what train wrote reads back


@pytest.mark.parametrize("i,rng", cases(2, 60), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_mutated_data(tmp_path, base, i, rng):
    data = tmp_path / "d.npz"
    data.write_bytes(mutate_npz((base / "data.npz").read_bytes(), rng))
    label = f"seed {SEED} case {i}: data mutated"
    run_case(tmp_path, ["eval", SHIPPED[i % len(SHIPPED)], "--data", data], [], label)
    if i % 4 == 0:
        out = tmp_path / "out"
        shutil.copytree(base / f"c{i % len(SHIPPED)}", out)
        run_case(tmp_path, ["train", out, "--data", data, "--epochs", "1", "--quiet", "--restart"],
                 [f"out{os.sep}checkpoint.npz", f"out{os.sep}train_log.jsonl"], label)
    if i % 6 == 1:   # a mutated file as the source examples adapt replays (adapt runs tune: a few cases)
        run_case(tmp_path, ["adapt", SHIPPED[0], "--data", base / "data.npz", "--replay", data, "--epochs", "1",
                            "--m", "1", "-o", tmp_path / "adapted", "--quiet"], ["adapted"], label)


# ------------------------------------------------------------------------------------------------- --config files
TOML_VALUES = ["0", "1", "-1", "2", "64", "100000", "8.7", "0.5", "-0.0", "1e308", "inf", "-inf", "nan", "true",
               "false", '"8"', '"16"', '"fc2"', '""', '"ce"', '"cosine"', '"data.npz"', '"../x.npz"', '"\\u00e9\\n"',
               "[]", "[1, 2]", '["fc2"]', '[["x"]]', "[true]", "{}", "{a = 1}", "{a = {b = [1]}}",
               "9223372036854775807", "-9223372036854775808", "0x" + "f" * 40, "1979-05-27T07:32:00Z",
               "07:32:00", "'''two\nlines'''"]


TYPED_VALUES = {int: ["0", "1", "-1", "2", "3", "64", "4096", "2147483648", "9223372036854775807"],
                float: ["0.0", "0.5", "1.0", "-1.0", "1e308", "1e-300", "inf", "nan", "16"],
                bool: ["true", "false"], str: ['""', '"fc2"', '"conv1"', '"data.npz"', '"nope.npz"', '"."', '"c.toml"']}


def typed_value(param, rng) -> str:
    """A value of the option's own type: a choice, or an edge of its int/float/bool/string range."""
    if isinstance(param.type, click.Choice):
        return f'"{param.type.choices[rng.integers(len(param.type.choices))]}"'
    kind = {"integer": int, "float": float, "boolean": bool}.get(param.type.name, str)
    values = TYPED_VALUES[bool if param.is_flag else kind]
    value = values[rng.integers(len(values))]
    return f"[{value}]" if param.multiple else value


def toml_config(section: str, rng) -> bytes:
    """A config for `section`: its options with values of their own type or of any TOML type, unknown keys
    and tables, or a broken file."""
    roll = rng.random()
    if roll < 0.06:
        return bytes(rng.integers(0, 256, int(rng.integers(1, 400)), dtype=np.uint8))
    if roll < 0.12:
        depth = int(rng.integers(100, 100_000))
        open_, close = ("[", "]") if rng.random() < 0.5 else ("{a = ", "}")
        return f"[{section}]\nm = {open_ * depth}{close * depth}\n".encode()
    params = [p for p in main.commands[section].params if p.name not in config.NOT_OPTIONS and isinstance(p, click.Option)]
    lines = [f"[{section}]"] if rng.random() < 0.9 else [f"[{['trian', 'compile', 'train', 'x.y'][rng.integers(4)]}]"]
    for _ in range(int(rng.integers(1, 4))):
        param = params[rng.integers(len(params))]
        key = config.long_name(param) if rng.random() < 0.9 else param.name    # python names are refused
        if rng.random() < 0.05:
            key = ["mm", "as-json", "memory-budget-mb", "config", "log-level", "x" * 300][rng.integers(6)]
        value = typed_value(param, rng) if rng.random() < 0.7 else TOML_VALUES[rng.integers(len(TOML_VALUES))]
        lines.append(f"{key} = {value}")
    if rng.random() < 0.1:
        lines.insert(0, ["m = 3", "compile = 3", "train = []", "[[compile]]"][rng.integers(4)])
    text = "\n".join(lines) + "\n"
    return BYTE_MUTATORS[rng.integers(3)](text.encode(), rng) if rng.random() < 0.1 else text.encode()


def config_path(tmp_path, section: str, rng):
    """The config file: usually a TOML file, sometimes a FIFO, a folder, /dev/zero, a model or nothing."""
    path = tmp_path / "c.toml"
    kind = rng.integers(0, 24)
    if kind == 0:
        os.mkfifo(path)
    elif kind == 1:
        path.mkdir()
    elif kind == 2:
        os.symlink("/dev/zero", path)
    elif kind == 3:
        os.symlink(SHIPPED[0], path)
    elif kind != 4:          # 4: no such file
        path.write_bytes(toml_config(section, rng))
    return path


def unblock(fifo):
    """If a reader ever opened the FIFO it would block: open its other end after 10 s (then exit 0 shows it)."""
    def open_writer():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:      # no reader: nothing blocks
            pass
    timer = threading.Timer(10, open_writer)
    timer.start()
    return timer


@pytest.fixture(scope="module")
def fresh(base):
    """A compiled folder with no training yet, for train to start."""
    out = base / "fresh"
    assert CliRunner().invoke(main, ["compile", str(SHIPPED[0]), "-o", str(out), "--m", "1"]).exit_code == 0
    return out


@pytest.mark.parametrize("i,rng", cases(3, 60), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_mutated_configs(tmp_path, base, fresh, i, rng):
    section = "train" if i % 3 == 0 else "compile"
    cfg = config_path(tmp_path, section, rng)
    shutil.copy(base / "data.npz", tmp_path / "data.npz")
    label = f"seed {SEED} case {i}: [{section}] config"
    timer = unblock(cfg) if cfg.is_fifo() else None
    try:
        if section == "compile":
            run_case(tmp_path, ["compile", SHIPPED[i % len(SHIPPED)], "-o", tmp_path / "out", "--config", cfg,
                                "--m", "1"], ["out"], label)
        else:
            out = tmp_path / "out"
            shutil.copytree(fresh, out)
            run_case(tmp_path, ["train", out, "--config", cfg, "--data", tmp_path / "data.npz", "--epochs", "1",
                                "--batch", "32", "--quiet"],
                     [f"out{os.sep}checkpoint.npz", f"out{os.sep}train_log.jsonl"], label)
    finally:
        if timer:
            timer.cancel()


# ------------------------------------------------------------------------------------------------- options
FREEZE = ["^fc2$", "fc", ".*", "(", "nothing", "conv1", "", "\\", "[a-", "fc1|fc2", "weight", "^$"]
FALSE_ALARM = ["0.05", "0", "1", "-1", "nan", "inf", "1e-9", "0.999", "abc", "", "0.5", "1e400"]


@pytest.fixture(scope="module")
def detector_data(tmp_path_factory):
    """The shipped detector and 64 of its relabelled target-test clips (0/1 labels)."""
    from fgcompile import models
    x, y = models.split("kws_detect", "target_test")
    path = tmp_path_factory.mktemp("detector") / "detect.npz"
    np.savez(path, x=x[:64], y=y[:64])
    return MODELS / "kws_detect" / "w8a8.onnx", path


@pytest.mark.parametrize("i,rng", cases(4, 30), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_mutated_options(tmp_path, base, detector_data, i, rng):
    """--freeze patterns with --last (and --estimator, --forward), eval --false-alarm on a detector, export over
    the user's file with and without --force: exit 0 or 2, and the user's file changes only under --force."""
    model = SHIPPED[rng.integers(len(SHIPPED))]
    label = f"seed {SEED} case {i}: options on {model.parent.name}"
    freeze = [a for _ in range(rng.integers(0, 3)) for a in ("--freeze", FREEZE[rng.integers(len(FREEZE))])]
    last = ["--last", str(rng.integers(0, 6))] if rng.random() < 0.5 else []
    # node perturbation refuses some sites (auto_pad Convs, attention) and forms; head every layer but the output's
    estimator = ["--estimator", ["node", "head"][rng.integers(2)], *(["--branches", "loop"] if rng.random() < 0.2 else []),
                 *(["--node-schedule", "alternate"] if rng.random() < 0.3 else []),
                 *(["--loss", "mse"] if rng.random() < 0.2 else [])] if rng.random() < 0.4 else []
    forward = ["--forward", ["exact", "qdq", "EXACT", ""][rng.integers(4)]] if rng.random() < 0.3 else []
    run_case(tmp_path, ["compile", model, "-o", tmp_path / "out", "--m", "1", *freeze, *last, *estimator, *forward],
             ["out"], label)
    detector, data = detector_data
    run_case(tmp_path, ["eval", detector, "--data", data, "--false-alarm", FALSE_ALARM[rng.integers(len(FALSE_ALARM))],
                        *(["--json"] if rng.random() < 0.5 else [])], [], label)
    if (tmp_path / "out" / "train.onnx").is_file():
        mine = tmp_path / ["notes.txt", "train.npz", "model.onnx"][rng.integers(3)]
        mine.write_bytes(b"the user's own file")
        force = rng.random() < 0.5
        run_case(tmp_path, ["export", tmp_path / "out", "-o", mine, *(["--force"] if force else [])],
                 [mine.name] if force else [], label)
        if not force:
            assert mine.read_bytes() == b"the user's own file", label


# ------------------------------------------------------------------------------------------------- fleet
MODES = ["alone", "federated", "centralized", "alone,federated", "", ",", "solo", "federated,federated", "ALONE"]
COUNTS = ["1", "0", "-1", "2", "x", "1.5", ""]


@pytest.fixture(scope="module")
def fleet_data(tmp_path_factory):
    """3 devices of the shipped digits fleet, 8 train and 4 test examples each, with their shifts."""
    f = dict(np.load(MODELS / "data" / "fleet_digits.npz"))
    keep = np.zeros(len(f["y"]), bool)
    for d in range(3):
        for split, n in ((0, 8), (1, 4)):
            keep[np.flatnonzero((f["device"] == d) & (f["split"] == split))[:n]] = True
    path = tmp_path_factory.mktemp("fleetfuzz") / "fleet.npz"
    np.savez(path, **{k: f[k][keep] for k in ("x", "y", "device", "split")}, shift=f["shift"][:3],
             shift_names=f["shift_names"])
    return path


@pytest.mark.parametrize("i,rng", cases(5, 24), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_mutated_fleet_files_and_options(tmp_path, fleet_data, i, rng):
    """A mutated fleet data file or --replay file, or mutated fleet options: exit 0 or 2, nothing written outside
    OUT."""
    label = f"seed {SEED} case {i}: fleet"
    data = tmp_path / "fleet.npz"
    if i % 4 == 2:   # a mutated file as the source examples the devices replay
        data.write_bytes(fleet_data.read_bytes())
        replay = tmp_path / "replay.npz"
        d = np.load(MODELS / "data" / "digits_source_train.npz")
        raw = io.BytesIO()
        np.savez(raw, x=d["x"][:12], y=d["y"][:12])
        replay.write_bytes(mutate_npz(raw.getvalue(), rng))
        options = ["--rounds", "1", "--replay", replay]
    elif i % 2 == 0:
        data.write_bytes(mutate_npz(fleet_data.read_bytes(), rng))
        options = ["--rounds", "1"]
    else:
        data.write_bytes(fleet_data.read_bytes())
        options = ["--modes", MODES[rng.integers(len(MODES))], "--rounds", COUNTS[rng.integers(len(COUNTS))],
                   "--local-epochs", COUNTS[rng.integers(len(COUNTS))], "--batch", COUNTS[rng.integers(len(COUNTS))],
                   "--upload", ["auto", "signs", "update", "bits"][rng.integers(4)]]
    run_case(tmp_path, ["fleet", SHIPPED[i % len(SHIPPED)], "--data", data, "-o", tmp_path / "f", "--m", "1", "--lr", "8",
                        "--quiet", *options], ["f"], label)
