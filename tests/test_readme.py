"""The README is a manual whose every command runs: each `fgcompile …` line of its ```bash blocks runs
in order, in one folder where `models` links to the shipped models (so the README's relative paths
resolve and later commands use what earlier ones wrote), and exits 0; its Python block runs there too.
Static checks: at most 350 lines, no issue numbers or commit hashes, and every flag in the command table
exists on its command."""
import pathlib
import importlib.util
import re
import shlex
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import MODELS
from fgcompile.cli import main

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.skipif(not README.exists(), reason="README.md is not beside the tests (installed wheel)")
TEXT = README.read_text(encoding="utf-8") if README.exists() else ""


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", TEXT, flags=re.S | re.M)


def commands() -> list[list[str]]:
    """The `fgcompile …` lines of the bash blocks as argument lists (a trailing backslash continues a line)."""
    found = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("fgcompile "):
                found.append(shlex.split(line, comments=True)[1:])
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    (d / "models").symlink_to(MODELS, target_is_directory=True)
    return d


def test_readme_has_commands():
    cmds = commands()
    assert len(cmds) >= 8 and {"compile", "tune", "train", "export", "adapt"} <= {c[0] for c in cmds}


@pytest.mark.parametrize("args", commands(), ids=lambda a: " ".join(a[:2]))
def test_readme_command_runs(args, workdir, monkeypatch):
    if "ray" in args and importlib.util.find_spec("ray") is None:
        pytest.skip("--backend ray needs the ray extra: pip install -e '.[test,ray]'")
    if "flower" in args and importlib.util.find_spec("flwr") is None:
        pytest.skip("--backend flower needs the fleet extra: pip install -e '.[test,fleet]'")
    monkeypatch.chdir(workdir)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, f"fgcompile {shlex.join(args)}\n{r.output}"


def test_readme_python_runs(workdir):
    """After the commands (pytest runs this file top to bottom), in the same folder."""
    (code,) = blocks("python")
    r = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "'accuracy'" in r.stdout and (workdir / "api-adapted.onnx").exists()


def test_readme_is_a_manual():
    lines = TEXT.splitlines()
    assert len(lines) <= 350, f"README.md has {len(lines)} lines (at most 350; measurements go to benchmarks/)"
    assert lines[2:5] == ["```bash",
                          "pip install -e . && fgcompile demo                  # set up, then adapt the shipped "
                          "model on-device style",
                          "pip install -e '.[test]' && python -m pytest        # set up, then run the tests"]
    issue = re.findall(r"#\d+", TEXT)
    assert not issue, f"issue numbers in README.md: {issue}"
    commit = re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", TEXT)
    assert not commit, f"commit hashes in README.md: {commit}"
    for word in ("this session", "load average"):
        assert word not in TEXT.lower()


def test_readme_command_table_flags_exist():
    """Every --flag in a row of the command table exists on that command."""
    rows = [line for line in TEXT.splitlines() if line.startswith("| `")]
    rows = [(re.match(r"\| `(\w+)", line)[1], line) for line in rows if re.match(r"\| `\w+[ `]", line)]
    rows = [(name, line) for name, line in rows if name in main.commands]
    assert {name for name, _ in rows} >= {"adapt", "inspect", "compile", "tune", "train", "eval", "export",
                                          "verify", "batch", "demo"}
    for name, line in rows:
        cmd = main.commands[name]
        known = {o for p in cmd.params for o in p.opts + p.secondary_opts}
        unknown = [f for f in re.findall(r"--[a-z][a-z-]*", line) if f not in known]
        assert not unknown, f"`fgcompile {name}` has no {unknown}"
