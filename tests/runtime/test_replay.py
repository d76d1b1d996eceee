"""The replay graph (runtime/replay.py) applies a step from its coefficients alone: fed the cᵢ a training step
computed, it gives that step's state bit for bit, equal to the numpy reference's replay, in every branch
form and with the options that change the update; node perturbation, the head estimator and a graph without probes are refused."""
import numpy as np
import onnx
import pytest

from fgcompile.spec import TrainSpec

from conftest import shipped
from fgcompile.errors import SpecError
from fgcompile.passes.pipeline import compile_graph
from fgcompile.runtime.replay import REPLAY_FORMAT, replay_graph
from fgcompile.runtime.step import scalar_feeds
from fgcompile.session import make_session
from reference import qzoff
from steps import Steps

SEED, BATCH, STEPS = 77, 32, 6


@pytest.mark.parametrize("model_file, options", [
    ("digits_cnn/w8a8.onnx", {"estimator": "sign"}),
    ("digits_cnn/w8a8.onnx", {"branches": "loop", "last": 2, "estimator": "sign"}),
    ("digits_cnn/w8a8.onnx", {"branches": "cloned", "last": 2, "m": 4}),
    ("digits_cnn/w8a8.onnx", {"momentum": 0.5, "sharpness": 1, "kernel_norm": True, "rounding": "stochastic"}),
    ("digits_cnn/w8a8.onnx", {"estimator": "spsa", "perturbation": "ternary", "density": 0.25}),
    ("digits_attn/w8a8.onnx", {"last": 2, "estimator": "sign"}),
])
def test_replay_equals_the_trained_step_and_the_reference(model_file, options, target_train):
    compiled = compile_graph(shipped(model_file), TrainSpec(**options))
    contract = compiled.contract
    replay = replay_graph(compiled.train, contract)
    names = {i.name for i in replay.graph.input}
    assert names == {contract.probes.coefficients, "seed", "step", "lr", *(s.name for s in contract.state)}
    assert [o.name for o in replay.graph.output] == [s.output for s in contract.state]
    assert REPLAY_FORMAT in replay.metadata_props[0].value
    onnx.checker.check_model(replay, full_check=True)
    sess = make_session(replay)
    c = qzoff.contract(compiled.train)
    train = Steps(compiled, probes=[contract.probes.coefficients])
    x, y = target_train
    state = ref = dict(compiled.state)
    lr = contract.lr_numerator.default
    moved = 0
    for k in range(STEPS):
        idx = np.arange(k * BATCH, (k + 1) * BATCH)
        out = train(x[idx], y[idx], SEED, k, lr, state)
        coef = out[contract.probes.coefficients]
        trained = train.next_state(out)
        replayed = dict(zip([s.name for s in contract.state], sess.run(None, {
            contract.probes.coefficients: coef, **state, **scalar_feeds(contract, SEED, k, lr)})))
        ref = qzoff.replay(c, ref, coef, SEED, k, lr)
        for s in contract.state:
            np.testing.assert_array_equal(replayed[s.name], trained[s.name], err_msg=f"step {k} {s.name}")
            np.testing.assert_array_equal(ref[s.name], trained[s.name], err_msg=f"reference, step {k} {s.name}")
            moved += int((trained[s.name] != state[s.name]).sum())
        state = trained
    assert moved > 0, "the steps changed nothing: the comparison would be vacuous"


def test_replay_of_other_coefficients_moves_the_other_way(target_train):
    """The replay reads its coefficients: negated cᵢ step the weights the opposite way."""
    compiled = compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(estimator="sign"))
    contract = compiled.contract
    sess = make_session(replay_graph(compiled.train, contract))
    coef = np.where(np.arange(contract.spec.m) % 3 == 0, 1, -1).astype(np.int32)
    feeds = {**compiled.state, **scalar_feeds(contract, SEED, 0, contract.lr_numerator.default)}
    plus = sess.run(None, {contract.probes.coefficients: coef, **feeds})
    minus = sess.run(None, {contract.probes.coefficients: -coef, **feeds})
    zero = sess.run(None, {contract.probes.coefficients: 0 * coef, **feeds})
    w = contract.state[0]
    start = compiled.state[w.name].astype(np.int64)
    np.testing.assert_array_equal(zero[0], compiled.state[w.name])
    assert (plus[0] != compiled.state[w.name]).any()
    inner = (start > w.qmin + 64) & (start < w.qmax - 64)   # away from saturation the steps are opposite
    np.testing.assert_array_equal((plus[0].astype(np.int64) - start)[inner], (start - minus[0].astype(np.int64))[inner])


@pytest.mark.parametrize("estimator, last", [("node", 2), ("head", 1)])
def test_activation_estimators_are_refused_with_the_reason(estimator, last):
    compiled = compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(estimator=estimator, last=last))
    with pytest.raises(SpecError, match=f"--estimator {estimator}.*integer update"):
        replay_graph(compiled.train, compiled.contract)
