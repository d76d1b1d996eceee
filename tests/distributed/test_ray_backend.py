"""--backend ray: batch writes the local backend's folders and summary byte for byte, tune records the local
backend's scores and choice bit for bit, both survive a Ray worker killed mid-task, and bad input (no ray,
an address that does not answer) is one clear error, exit 2.

The tests use the cluster at RAY_ADDRESS when it is set (CI starts one with `ray start --head`), else a local
instance of 2 CPUs; without the ray extra they skip, but for the ones that simulate its absence.
"""
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import fgcompile
import ray_faults
from conftest import MODELS
from fgcompile.cli import main
from fgcompile.errors import DataError

try:
    import ray
except ImportError:
    ray = None

TESTS = pathlib.Path(__file__).resolve().parents[1]
CNN = MODELS / "digits_cnn" / "w8a8.onnx"
needs_ray = pytest.mark.skipif(ray is None, reason="the ray extra is not installed (pip install 'fgcompile[ray]')")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Ray, connected for this module, with ray_faults in every worker (armed by the kill tests)."""
    if ray is None:
        pytest.skip("the ray extra is not installed (pip install 'fgcompile[ray]')")
    faults = tmp_path_factory.mktemp("faults")
    ray.cloudpickle.register_pickle_by_value(ray_faults)
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address or "local", num_cpus=None if address else 2, log_to_driver=False,
             runtime_env={"env_vars": {"FAULTS_DIR": str(faults)}, "worker_process_setup_hook": ray_faults.install})
    yield faults
    ray.shutdown()


def run(*args, code=0):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    assert r.exit_code == code, r.output
    return r


def tree(folder: pathlib.Path) -> dict:
    """{relative path: sha256} of every file but the summary, whose times differ."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "summary.json"}


def summary(folder: pathlib.Path) -> list:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in json.loads((folder / "summary.json").read_text())]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> pathlib.Path:
    """A folder of the shipped models (w8a8 and w16a8, the tflite dialect's, the test data's) and two that fail:
    a float model and a file that is not a model."""
    folder = tmp_path_factory.mktemp("models")
    for source in sorted(MODELS.glob("*/w*a8.onnx")) + [MODELS / "digits_cnn" / "fp32.onnx"]:
        shutil.copy(source, folder / f"{source.parent.name}_{source.name}")
    for source in sorted(MODELS.glob("tflite/*.onnx")) + sorted((TESTS / "data").glob("*.onnx")):
        shutil.copy(source, folder / source.name)
    (folder / "not_a_model.onnx").write_bytes(b"\x89PNG this is not a model")
    assert len(list(folder.iterdir())) >= 12
    return folder


@pytest.fixture(scope="module")
def local_batch(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    r = run("batch", models, "-o", out, code=1)   # the float model and the non-model fail
    return out, r


@needs_ray
def test_batch_on_ray_writes_the_local_folders_and_summary(cluster, models, local_batch, tmp_path):
    local, local_run = local_batch
    out = tmp_path / "out"
    r = run("batch", models, "-o", out, "--backend", "ray", code=1)
    assert tree(out) == tree(local) and len(tree(out)) >= 10 * 6
    assert summary(out) == summary(local)
    assert [row["status"] for row in summary(out)].count("error") == 2
    progress = lambda res: sorted(line for line in res.stderr.splitlines() if line.startswith("  "))
    assert progress(r) == progress(local_run)


@needs_ray
def test_batch_survives_a_worker_killed_mid_task(cluster, models, local_batch, tmp_path):
    local, _ = local_batch
    (cluster / "armed").touch()
    out = tmp_path / "out"
    run("batch", models, "-o", out, "--backend", "ray", code=1)
    assert (cluster / "fired").exists() and not (cluster / "armed").exists()   # a worker did die
    (cluster / "fired").unlink()
    assert tree(out) == tree(local) and summary(out) == summary(local)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "out"
    run("compile", CNN, "-o", out, "--m", "8")
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory, target_train) -> pathlib.Path:
    x, y = target_train
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, x=x[:150], y=y[:150])
    return path


TUNE = ("--epochs", 1, "--folds", 2, "--seeds", 2, "--schedule", "constant")


def tune_record(out, data, *backend):
    """(OUT/tune.json without its time, the progress lines without theirs)."""
    r = run("tune", out, "--data", data, *TUNE, *backend)
    record = json.loads((out / "tune.json").read_text())
    del record["seconds"]
    return record, [re.sub(r" \(\d+\.\d s\)$", "", line) for line in r.stderr.splitlines()]


@pytest.fixture(scope="module")
def local_tune(compiled, data):
    return tune_record(compiled, data)


@needs_ray
def test_tune_on_ray_scores_and_chooses_as_local(cluster, compiled, data, local_tune):
    record, lines = tune_record(compiled, data, "--backend", "ray")
    assert record == local_tune[0] and lines == local_tune[1]
    assert len(record["scores"]) >= 5 and all(len(s["runs"]) == 4 for s in record["scores"])
    assert len({s["val_loss"] for s in record["scores"]}) > 1   # the rates were told apart


@needs_ray
def test_tune_survives_a_worker_killed_mid_trial(cluster, compiled, data, local_tune):
    (cluster / "armed").touch()
    record, _ = tune_record(compiled, data, "--backend", "ray")
    assert (cluster / "fired").exists()
    (cluster / "fired").unlink()
    assert record == local_tune[0]


@needs_ray
def test_tune_of_an_in_memory_compile_on_ray(cluster, target_train):
    compiled = fgcompile.compile_model(CNN, fgcompile.TrainSpec(m=8, seed=5))
    x, y = target_train[0][:120], target_train[1][:120]
    kw = dict(epochs=1, folds=2, seeds=1, schedule="constant")
    local, remote = fgcompile.tune(compiled, (x, y), **kw), fgcompile.tune(compiled, (x, y), backend="ray", **kw)
    del local["seconds"], remote["seconds"]
    assert remote == local


# bad input: (command, its arguments after the ones it needs, the message); each exits 2 with one paragraph
BACKEND_CASES = {
    "address without --backend ray": ("batch", ["--address", "127.0.0.1:6379"], "only --backend ray connects"),
    "tune address without --backend ray": ("tune", ["--address", "127.0.0.1:6379"], "only --backend ray connects"),
    "unknown backend": ("batch", ["--backend", "spark"], "'spark' is not one of 'local', 'ray'"),
    "jobs 0 on ray": ("batch", ["--backend", "ray", "--jobs", "0"], "--jobs 0: must be at least 1"),
}


@pytest.mark.parametrize("case", list(BACKEND_CASES))
def test_backend_catalogue(tmp_path, compiled, data, case):
    command, args, message = BACKEND_CASES[case]
    before = sorted(os.listdir(compiled))
    needed = [CNN.parent, "-o", tmp_path / "out"] if command == "batch" else [compiled, "--data", data]
    r = run(command, *needed, *args, code=2)
    assert message in r.output
    assert not (tmp_path / "out").exists() and sorted(os.listdir(compiled)) == before


@pytest.mark.parametrize("command", ["batch", "tune"])
def test_backend_ray_without_ray_installed(tmp_path, compiled, data, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "ray", None)    # `import ray` raises ImportError
    before = sorted(os.listdir(compiled))
    needed = [CNN.parent, "-o", tmp_path / "out"] if command == "batch" else [compiled, "--data", data]
    r = run(command, *needed, "--backend", "ray", code=2)
    assert "pip install 'fgcompile[ray]'" in r.output and "Ray is not installed" in r.output
    assert not (tmp_path / "out").exists() and sorted(os.listdir(compiled)) == before


def cli(*args, env=None, cluster=False):
    """fgcompile in a process of its own: no ray.init of these tests' to reuse (cluster: RAY_ADDRESS's, if set)."""
    environ = {k: v for k, v in os.environ.items() if cluster or k != "RAY_ADDRESS"} | (env or {})
    return subprocess.run([sys.executable, "-m", "fgcompile.cli", *map(str, args)], capture_output=True, text=True,
                          env=environ, timeout=120)


@needs_ray
@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS", "not an address"])
def test_an_unreachable_address_is_one_paragraph(tmp_path, how):
    closed = "127.0.0.1:1"   # nothing listens on port 1
    args = {"--address": ["--address", closed], "RAY_ADDRESS": [], "not an address": ["--address", "headnode"]}[how]
    r = cli("batch", CNN.parent, "-o", tmp_path / "out", "--backend", "ray", *args,
            env={"RAY_ADDRESS": closed} if how == "RAY_ADDRESS" else None)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, r.stderr
    expected = "not a Ray address; give the head node's HOST:PORT" if how == "not an address" else \
        f"cannot connect to the Ray cluster at {closed}"
    assert expected in error[0] and "ray start --head" in error[0] and not (tmp_path / "out").exists()


@needs_ray
def test_a_model_past_the_timeout_is_a_row(cluster, tmp_path):
    for name in ("a", "b", "c"):
        shutil.copy(CNN, tmp_path / f"{name}.onnx")
    r = run("batch", tmp_path, "-o", tmp_path / "out", "--backend", "ray", "--timeout", "0.001", code=1)
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [row["model"] for row in rows] == ["a.onnx", "b.onnx", "c.onnx"]
    assert all("stopped after the --timeout of 0.001 s" in row["error"] for row in rows), rows
    assert os.listdir(tmp_path / "out") == ["summary.json"] and "0 compiled, 3 failed" in r.stdout


@needs_ray
def test_fgcompile_variables_reach_the_workers(tmp_path):
    """The command's own ray.init passes FGCOMPILE_* on, so a worker compiles under the same limits."""
    for source in (CNN, MODELS / "kws_dscnn" / "w8a8.onnx"):
        shutil.copy(source, tmp_path / f"{source.parent.name}.onnx")
    limit = {"FGCOMPILE_MAX_NODES": "5"}
    local = cli("batch", tmp_path, "-o", tmp_path / "local", env=limit)
    remote = cli("batch", tmp_path, "-o", tmp_path / "ray", "--backend", "ray", env=limit, cluster=True)
    assert (local.returncode, remote.returncode) == (1, 1), remote.stderr
    assert "Traceback" not in remote.stderr
    assert summary(tmp_path / "ray") == summary(tmp_path / "local")
    assert all("over the limit of 5" in row["error"] for row in summary(tmp_path / "ray"))


@needs_ray
def test_a_folder_recompiled_under_a_ray_tune_is_its_own_error(cluster, tmp_path, data):
    """A worker rebuilds the Program from the folder; one whose train.onnx is no longer the driver's is refused
    with the worker's DataError, not a Ray traceback."""
    out = tmp_path / "out"
    run("compile", CNN, "-o", out, "--m", "8")
    trainer = fgcompile.Trainer(out)
    run("compile", CNN, "-o", out, "--m", "4")
    with pytest.raises(DataError, match="train.onnx changed while tune ran"):
        fgcompile.tune(trainer, str(data), epochs=1, folds=2, seeds=1, backend="ray")
    assert not (out / "tune.json").exists()


@needs_ray
def test_a_task_that_raises_is_its_own_error_not_a_lost_worker(cluster, tmp_path, monkeypatch):
    """A batch task that raises (here the workers' refusal of a working folder they do not have) is its row's
    error as the task raised it, not Ray's "ray::_in_folder() (pid=...)" line blamed on a lost worker."""
    shutil.copy(CNN, tmp_path / "cnn.onnx")
    monkeypatch.setattr(os, "getcwd", lambda: "/nonexistent/driver-folder")   # as if the driver ran on another host
    r = run("batch", tmp_path, "-o", tmp_path / "out", "--backend", "ray", code=1)
    monkeypatch.undo()
    [row] = summary(tmp_path / "out")
    assert row["error"].startswith("/nonexistent/driver-folder: the driver's working folder is not on this Ray "
                                   "worker's host"), row["error"]
    assert "pid=" not in row["error"] and "lost worker" not in row["error"] and "Traceback" not in r.output
