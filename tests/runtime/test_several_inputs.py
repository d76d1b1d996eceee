"""A model with several data inputs (image + metadata, input_ids + mask) trains from an .npz holding one
array per input, named as the input, plus y; the step matches the reference bit for bit."""
import numpy as np
import onnx
from click.testing import CliRunner

import qdq_graphs
from fgcompile.cli import main
from fgcompile.passes.pipeline import compile_graph
from fgcompile.runtime.data import Inputs
from fgcompile.spec import TrainSpec
from reference import qzoff
from steps import Steps


def batch(rng, n):
    return {"x": rng.uniform(0, 1, (n, 4)).astype(np.float32), "ids": rng.integers(0, 20, (n, 3))}, rng.integers(0, 5, n)


def test_two_inputs_step_matches_reference():
    compiled = compile_graph(qdq_graphs.two_input_model(), TrainSpec(m=2))
    c = qzoff.contract(compiled.train)
    assert c["data_inputs"] == ["x", "ids"]
    oracle = qzoff.InferenceOracle(compiled.source, c)
    run = Steps(compiled)
    rng, state, changed = np.random.default_rng(0), dict(compiled.state), 0
    for k in range(4):
        x, y = batch(rng, 16)
        out = run(Inputs(x), y, 7, k, c["lr_numerator"]["default"], state)
        want, _ = qzoff.step(oracle, c, state, x, y, 7, k, c["lr_numerator"]["default"])
        for s in c["state"]:
            np.testing.assert_array_equal(out[s["output"]], want[s["name"]])
            changed += int((want[s["name"]] != state[s["name"]]).sum())
        state = want
    assert changed


def test_two_inputs_end_to_end(tmp_path):
    onnx.save(qdq_graphs.two_input_model(), tmp_path / "two.onnx")
    x, y = batch(np.random.default_rng(1), 64)
    np.savez(tmp_path / "d.npz", **x, y=y)
    np.savez(tmp_path / "only_x.npz", x=x["x"], y=y)
    run = lambda *a: CliRunner().invoke(main, [str(v) for v in a])
    for args in (["compile", tmp_path / "two.onnx", "-o", tmp_path / "out"],
                 ["train", tmp_path / "out", "--data", tmp_path / "d.npz", "--val", tmp_path / "d.npz",
                  "--epochs", "2", "--quiet"],
                 ["eval", tmp_path / "out", "--data", tmp_path / "d.npz"],
                 ["verify", tmp_path / "out", "--steps", "2"],
                 ["export", tmp_path / "out", "-o", tmp_path / "adapted.onnx"],
                 ["eval", tmp_path / "adapted.onnx", "--data", tmp_path / "d.npz"]):
        r = run(*args)
        assert r.exit_code == 0, (args, r.output)
    r = run("train", tmp_path / "out", "--data", tmp_path / "only_x.npz", "--restart", "--quiet")
    assert r.exit_code == 2 and "ids" in r.output and "Traceback" not in r.output, r.output
