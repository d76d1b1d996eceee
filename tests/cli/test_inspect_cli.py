"""`fgcompile inspect`: the listing matches the graph; bad files give one clear line and exit 2."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from conftest import MODELS
from fgcompile.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("name", ["digits_cnn/w8a8.onnx", "digits_attn/w16a8.onnx"])
def test_listing_matches_graph(name):
    model = onnx.load(MODELS / name)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    expected = {}
    for n in model.graph.node:  # independent of the analyze pass: walk the protos
        if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in dq and dq[n.input[1]].input[0] in inits:
            w = inits[dq[n.input[1]].input[0]]
            expected[dq[n.input[1]].input[0]] = (n.op_type, list(w.shape), str(w.dtype))
    result = run("inspect", MODELS / name, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["parameters"]
    weights = [r for r in rows if r["role"] == "weight"]
    assert {r["tensor"]: (r["op"], list(r["shape"]), r["dtype"]) for r in weights} == expected
    for r in rows:
        assert r["params"] == int(np.prod(r["shape"]))
        assert r["train_bytes"] > r["params"]
    table = run("inspect", MODELS / name)
    assert f"{len(expected)} weight sites" in table.output


def test_float_model(tmp_path):
    r = run("inspect", MODELS / "digits_cnn" / "fp32.onnx")
    assert r.exit_code == 2 and "not quantized" in r.output and "Traceback" not in r.output


def test_missing_file(tmp_path):
    r = run("inspect", tmp_path / "nope.onnx")
    assert r.exit_code == 2 and "no such file" in r.output


@pytest.mark.parametrize("content", [b"this is not onnx", b""])
def test_corrupt_file(tmp_path, content):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    r = run("inspect", p)
    assert r.exit_code == 2 and ("not a readable ONNX" in r.output or "truncated" in r.output)


def test_truncated_file(tmp_path):
    data = (MODELS / "digits_cnn" / "w8a8.onnx").read_bytes()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: len(data) // 2])
    r = run("inspect", p)
    assert r.exit_code == 2 and "Traceback" not in r.output


@pytest.mark.parametrize("flag", [("--momentum", 0.25), ("--sharpness", 16)])
def test_estimate_counts_the_momentum_buffer(flag):
    # --momentum/--sharpness carry an int32 buffer per trained tensor as state: the estimate holds it as
    # an input and an output, beside whatever its update needs, in both branch forms
    from fgcompile.compiler import compile_model
    from fgcompile.spec import TrainSpec
    name = MODELS / "digits_cnn" / "w8a8.onnx"
    plain = json.loads(run("inspect", name, "--json").output)["parameters"]
    buffered = json.loads(run("inspect", name, *flag, "--json").output)["parameters"]
    spec = TrainSpec(**{flag[0][2:]: flag[1]})
    compiled = compile_model(onnx.load(name), spec)
    buffers = {e.name: compiled.state[e.name] for e in compiled.contract.state if e.role == "momentum"}
    assert buffers and all(v.dtype == np.int32 for v in buffers.values())
    rows = {a["tensor"]: (a, b) for a, b in zip(plain, buffered)}
    for buffer, state in buffers.items():
        a, b = rows[buffer.removesuffix("__momentum")]
        for key in ("train_bytes", "loop_bytes"):
            assert b[key] - a[key] >= 2 * state.nbytes, (buffer, key)


def test_estimate_refuses_a_bad_momentum():
    r = run("inspect", MODELS / "digits_cnn" / "w8a8.onnx", "--momentum", "1.5")
    assert r.exit_code == 2 and "--momentum 1.5" in r.output and "Traceback" not in r.output


@pytest.mark.slow
@pytest.mark.parametrize("branches", ["loop", "stacked"])
@pytest.mark.parametrize("depth", [2, 3])
def test_estimate_bounds_the_measured_peak(depth, branches, tmp_path):
    """inspect's estimate for ResNet-18's last 2 sites and last block (2.4M and 4.7M trained weights), in
    the loop and the stacked form, is at least what the training process holds above inference: VmHWM of
    fresh processes (benchmarks/memory.py), m = 8, batch 32. Needs the bench models
    (models/recipes/build_bench.py)."""
    import pathlib
    import sys
    from fgcompile.compiler import compile_model, write_compiled
    from fgcompile.inspection import inspect_model
    from fgcompile.spec import TrainSpec
    path = pathlib.Path.home() / ".cache" / "fgcompile-bench" / "resnet18" / "w8a8.onnx"
    if not path.exists():
        pytest.skip("run models/recipes/build_bench.py first")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
    import memory
    source = onnx.load(path)
    compiled = compile_model(source, TrainSpec(m=8, last=depth, branches=branches))
    write_compiled(compiled, tmp_path / "compiled")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((32, 3, 96, 96)).astype(np.float32),
             y=rng.integers(0, 10, 32).astype(np.int64))
    infer = memory.measure("inference", model=str(path), data=str(tmp_path / "data.npz"), batch=32, iterations=3)
    train = memory.measure("training", compiled=str(tmp_path / "compiled"), data=str(tmp_path / "data.npz"),
                           batch=32, iterations=3)
    trained = {s.name for s in compiled.contract.state}
    estimate = sum(r.loop_bytes if branches == "loop" else r.train_bytes
                   for r in inspect_model(source, m=8) if r.tensor in trained) / 2 ** 20
    assert estimate >= train["peak_mb"] - infer["peak_mb"] > 0
