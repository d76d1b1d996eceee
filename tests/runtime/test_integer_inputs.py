"""A model whose data input is integer token ids compiles, steps bit for bit with the reference, trains,
evaluates and exports from an .npz whose x holds integers."""
import numpy as np
import onnx
from click.testing import CliRunner

import qdq_graphs
from fgcompile.cli import main
from fgcompile.passes.pipeline import compile_graph
from fgcompile.spec import TrainSpec
from reference import qzoff
from steps import Steps


def test_token_id_step_matches_reference():
    model = qdq_graphs.token_id_model()
    compiled = compile_graph(model, TrainSpec(m=2))
    c = qzoff.contract(compiled.train)
    assert c["inputs"]["data"] == "ids"
    oracle = qzoff.InferenceOracle(compiled.source, c)
    run = Steps(compiled)
    rng = np.random.default_rng(0)
    state, changed = dict(compiled.state), 0
    for k in range(4):
        x, y = rng.integers(0, 20, (16, 4)).astype(np.int64), rng.integers(0, 5, 16)
        out = run(x, y, c["spec"]["seed"], k, c["lr_numerator"]["default"], state)
        want, _ = qzoff.step(oracle, c, state, x, y, c["spec"]["seed"], k, c["lr_numerator"]["default"])
        for s in c["state"]:
            np.testing.assert_array_equal(out[s["output"]], want[s["name"]])
            changed += int((want[s["name"]] != state[s["name"]]).sum())
        state = {s["name"]: want[s["name"]] for s in c["state"]}
    assert changed


def test_token_ids_end_to_end(tmp_path):
    onnx.save(qdq_graphs.token_id_model(), tmp_path / "ids.onnx")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 20, (64, 4)).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 5, 64))
    np.savez(tmp_path / "f.npz", x=x.astype(np.float32), y=rng.integers(0, 5, 64))
    run = lambda *a: CliRunner().invoke(main, [str(v) for v in a])
    for args in (["compile", tmp_path / "ids.onnx", "-o", tmp_path / "out"],
                 ["train", tmp_path / "out", "--data", tmp_path / "d.npz", "--epochs", "2", "--quiet"],
                 ["eval", tmp_path / "out", "--data", tmp_path / "d.npz"],
                 ["export", tmp_path / "out", "-o", tmp_path / "adapted.onnx"],
                 ["eval", tmp_path / "adapted.onnx", "--data", tmp_path / "d.npz"]):
        r = run(*args)
        assert r.exit_code == 0, (args, r.output)
    r = run("eval", tmp_path / "out", "--data", tmp_path / "f.npz")
    assert r.exit_code == 2 and "takes int64 inputs (e.g. token ids)" in r.output
