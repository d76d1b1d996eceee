"""The runtime's step is a pure function of (program, state, batch, lr): it changes none of its inputs,
gives the same result for the same arguments, and a Trainer's fit is nothing but step() folded over the
documented batch order and schedule, in memory and in a folder alike (runtime/step.py, runtime/loop.py)."""
import dataclasses
import math

import numpy as np
import pytest

import fgcompile
from conftest import shipped
from fgcompile.runtime.program import Program
from fgcompile.runtime.state import TrainState
from fgcompile.runtime.step import step
from fgcompile.runtime.trainer import Trainer, latest_state
from fgcompile.spec import TrainSpec

ONE_THREAD = fgcompile.SessionSettings(threads=1)
N, BATCH, EPOCHS = 96, 16, 2          # 6 steps an epoch, 12 in all


@pytest.fixture(scope="module")
def compiled():
    # momentum 0.9: the state carries buffers beside the weights, so they are folded too
    return fgcompile.compile_model(shipped("digits_cnn/w8a8.onnx"),
                                   TrainSpec(m=4, last=2, estimator="sign", rounding="stochastic", momentum=0.9, seed=7))


@pytest.fixture(scope="module")
def program(compiled):
    return Program.of_compiled(compiled, ONE_THREAD)


@pytest.fixture(scope="module")
def data(target_train):
    return target_train[0][:N], target_train[1][:N]


def copied(state: TrainState) -> dict:
    return {k: np.array(v, copy=True) for k, v in state.tensors.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_state_carries_momentum_buffers(program):
    roles = {s.role for s in program.contract.state}
    assert "momentum" in roles and "weight" in roles


def test_step_changes_none_of_its_inputs(program, data):
    x, y = data[0][:BATCH], data[1][:BATCH]
    x0, y0 = x.copy(), y.copy()
    state = TrainState(program.initial, step=3, bad_steps=1)
    before, spec = copied(state), program.spec
    after, metrics = step(program, state, (x, y), 4096)
    assert_same(dict(state.tensors), before)
    assert (state.step, state.bad_steps) == (3, 1)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)
    assert program.spec is spec and dict(program.initial).keys() == before.keys()
    assert (after.step, after.bad_steps) == (4, 1) and metrics is not None
    assert any((after.tensors[k] != before[k]).any() for k in before), "the step moved the state"
    with pytest.raises((TypeError, ValueError)):    # a state cannot be changed in place
        after.tensors[next(iter(before))][...] = 0
    with pytest.raises(TypeError):
        after.tensors["W"] = before[next(iter(before))]
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.step = 0


def test_same_arguments_same_result(program, data):
    state = TrainState(program.initial, step=5)
    batch = (data[0][:BATCH], data[1][:BATCH])
    a, ma = step(program, state, batch, 2048)
    b, mb = step(program, state, batch, 2048)
    assert ma == mb and (a.step, a.bad_steps) == (b.step, b.bad_steps)
    assert_same(dict(a.tensors), dict(b.tensors))
    c, _ = step(program, dataclasses.replace(state, step=6), batch, 2048)   # another step: other perturbations
    assert any((a.tensors[k] != c.tensors[k]).any() for k in a.tensors)


def fold(program, x, y, peak: int, steps: int) -> TrainState:
    """step() folded over the order the Trainer documents: epoch e's batches are consecutive slices of
    permutation(default_rng([seed, e])), the rate the cosine schedule over the run's total steps."""
    per_epoch = len(y) // BATCH
    total = EPOCHS * per_epoch
    state = TrainState(program.initial)
    for k in range(steps):
        epoch, pos = divmod(k, per_epoch)
        idx = np.random.default_rng([program.spec.seed, epoch]).permutation(len(y))[pos * BATCH:(pos + 1) * BATCH]
        lr = max(1, round(peak * 0.5 * (1 + math.cos(math.pi * k / total))))
        state, _ = step(program, state, (x[idx], y[idx]), lr)
    return state


@pytest.mark.parametrize("steps", [12, 8])      # the whole run, and one stopped mid-epoch
def test_fit_is_step_folded_over_the_batch_order(compiled, program, data, steps):
    trainer = Trainer(compiled, session=ONE_THREAD)
    trainer.fit(data, epochs=EPOCHS, batch=BATCH, schedule="cosine", progress=False, stop_after=steps)
    want = fold(program, *data, compiled.contract.lr_numerator.default, steps)
    assert trainer.meta == {"step": steps, "bad_steps": 0} == {"step": want.step, "bad_steps": want.bad_steps}
    assert_same(trainer.state, dict(want.tensors))


def test_in_memory_and_folder_runs_are_identical(compiled, data, tmp_path):
    run = dict(epochs=EPOCHS, batch=BATCH, schedule="cosine", progress=False, checkpoint_every=5)
    memory = Trainer(compiled, session=ONE_THREAD)
    in_memory = memory.fit(data, data, **run)
    on_disk = Trainer(fgcompile.write_compiled(compiled, tmp_path / "out"), session=ONE_THREAD)
    in_folder = on_disk.fit(data, data, **run)
    assert_same(memory.state, on_disk.state)
    assert_same(memory.state, latest_state(tmp_path / "out"))       # the checkpoint holds the same
    assert any((memory.state[k] != compiled.state[k]).any() for k in compiled.state), "training moved the state"
    drop = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]
    assert drop(in_memory) == drop(in_folder) and len(in_memory) == EPOCHS
    assert (tmp_path / "out" / "train_log.jsonl").read_text().count("\n") == EPOCHS


def test_train_sessions_allocate_on_demand(compiled, tmp_path):
    # the training step's session skips onnxruntime's memory pattern (fgcompile.session.TRAINING_MEMORY_PATTERN);
    # eval keeps onnxruntime's default, as the deployed model runs
    from fgcompile.compiler import write_compiled
    from fgcompile.session import TRAINING_MEMORY_PATTERN
    write_compiled(compiled, tmp_path / "out")
    for program in (Program.of_compiled(compiled, ONE_THREAD), Program.of_folder(tmp_path / "out", ONE_THREAD)):
        assert program.train.get_session_options().enable_mem_pattern is TRAINING_MEMORY_PATTERN
        assert program.eval.get_session_options().enable_mem_pattern is True
