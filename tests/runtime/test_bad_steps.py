"""A NaN or Inf loss never reaches the state: the graph gives c = 0, the trainer skips and counts.

(In a QDQ model the input QuantizeLinear absorbs a NaN input, so these tests use a model with a float
path from the input to the logits.)"""
import numpy as np
import pytest

from fgcompile.compiler import compile_model, write_compiled
from fgcompile.errors import FgcompileError
from fgcompile.runtime.trainer import Trainer, latest_state
from fgcompile.spec import TrainSpec
from qdq_graphs import qdq_model
from steps import Steps

RNG = np.random.default_rng(0)
X, Y = RNG.uniform(0, 1, (64, 3)).astype(np.float32), RNG.integers(0, 4, 64)


def test_graph_leaves_state_unchanged_on_nan():
    compiled = compile_model(qdq_model(float_residual=True), TrainSpec(m=3))
    run = Steps(compiled, optimization="all")
    x = X[:16].copy()
    x[3] = np.nan
    out = run(x, Y[:16], 1, 0, 10000)
    assert np.isnan(out["loss"])
    for s in compiled.contract.state:
        np.testing.assert_array_equal(out[s.output], compiled.state[s.name])
    out = run(X[:16], Y[:16], 1, 0, 10000)
    assert any((out[s.output] != compiled.state[s.name]).any() for s in compiled.contract.state)


def test_trainer_skips_and_counts_bad_steps(tmp_path):
    source = qdq_model(float_residual=True)
    compiled = compile_model(source, TrainSpec())
    write_compiled(compiled, tmp_path / "o")
    x = X.copy()
    x[:32] = np.finfo(np.float32).max  # finite (data with NaN/Inf is refused) but overflows the float path;
    # batch 64 = all the data: every step sees the bad samples
    t = Trainer(tmp_path / "o")
    t.fit((x, Y), epochs=3, batch=64, progress=False)
    assert t.meta["bad_steps"] == 3
    for k, v in latest_state(tmp_path / "o").items():
        np.testing.assert_array_equal(v, compiled.state[k])
    t2 = Trainer(tmp_path / "o")
    with pytest.raises(FgcompileError, match="--max-bad-steps 1"):
        t2.fit((x, Y), epochs=5, batch=64, progress=False, max_bad_steps=1, restart=True)
    assert t2.meta["bad_steps"] == 2
