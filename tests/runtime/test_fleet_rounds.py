"""The fleet's pieces (runtime/fleet.py): the signs a device uploads decode to its coefficients; the
server's replay of a device's round is the device's own model bit for bit, and equals the numpy
reference's replay of the same signs; a summed integer update equals it too; federated rounds are the
rounds' uploads applied in device order, whatever order they arrive in."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import MODELS
from fgcompile import modelio
from fgcompile.compiler import compile_model, write_compiled
from fgcompile.errors import SpecError
from fgcompile.passes.pipeline import compile_graph
from fgcompile.runtime import fleet
from fgcompile.runtime.program import Program
from fgcompile.session import SessionSettings
from fgcompile.spec import TrainSpec
from reference import qzoff

CNN = MODELS / "digits_cnn" / "w8a8.onnx"


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(1, 40), m=st.integers(1, 70), estimator=st.sampled_from(["sign", "spsa"]),
       seed=st.integers(0, 2 ** 32 - 1), ties=st.floats(0, 1), bad=st.floats(0, 1))
def test_signs_decode_to_the_coefficients(steps, m, estimator, seed, ties, bad):
    rng = np.random.default_rng(seed)
    c = rng.choice([-1, 1], (steps, m)) if estimator == "sign" else rng.integers(-127, 128, (steps, m))
    c = np.where(rng.random((steps, m)) < ties * 0.3, 0, c).astype(np.int32)
    failed = rng.random(steps) < bad * 0.3
    payload = fleet.encode_signs(c, failed, estimator)
    got, got_bad = fleet.decode_signs(payload, steps, m, estimator)
    np.testing.assert_array_equal(got, c)
    np.testing.assert_array_equal(got_bad, failed)
    if estimator == "sign" and not (c == 0).any() and not failed.any():
        assert len(payload) == (steps * m + 7) // 8      # m bits per step, nothing else


def test_a_tie_costs_a_byte_and_a_failed_step_is_marked_after_a_zero():
    c = np.ones((600, 64), np.int32)
    c[0, 0] = c[0, 5] = c[599, 63] = 0          # gaps 1, 5 and 38394 (three varint bytes)
    bad = np.zeros(600, bool)
    bad[598] = True
    payload = fleet.encode_signs(c, bad, "sign")
    assert len(payload) == 600 * 64 // 8 + (1 + 1 + 3) + 1 + 2
    got, got_bad = fleet.decode_signs(payload, 600, 64, "sign")
    np.testing.assert_array_equal(got, c)
    assert got_bad[598] and got_bad.sum() == 1
    assert len(fleet.encode_signs(c, np.zeros(600, bool), "sign")) == 600 * 64 // 8 + 5   # no failed step: no 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A compiled digits CNN (its program outputs the coefficients) and 3 small devices of target data."""
    def make(spec):
        compiled = compile_model(modelio.load_model(CNN), spec)
        out = tmp_path_factory.mktemp("fleet") / "c"
        write_compiled(compiled, out)
        probes = (compiled.contract.probes.coefficients,)
        program = Program.of_folder(out, SessionSettings(), probes=probes)
        d = np.load(MODELS / "data" / "digits_target_train.npz")
        devices = [fleet.Device(i, (d["x"][i::3][:24], d["y"][i::3][:24]), (d["x"][i::3][24:40], d["y"][i::3][24:40]))
                   for i in range(3)]
        return compiled, program, devices
    return make


@pytest.mark.parametrize("spec", [TrainSpec(m=8), TrainSpec(m=4, last=2, branches="loop", estimator="sign"),
                                  TrainSpec(m=4, momentum=0.5, rounding="stochastic")], ids=["stacked", "loop", "momentum"])
def test_the_server_replays_each_device_to_its_own_model(setup, spec):
    compiled, program, devices = setup(spec)
    schedule = fleet.Schedule(rounds=2, local_epochs=2, batch=8, lr_numerator=2048, seed=3)
    server = fleet.Server(program.contract, compiled.train, schedule)
    c = qzoff.contract(compiled.train)
    start = dict(program.initial)
    moved = 0
    for device in devices:
        upload, own = fleet.device_round(program, start, device, 1, schedule, "signs")
        assert upload.steps == 2 * (24 // 8) and upload.nbytes >= (upload.steps * spec.m + 7) // 8
        replayed = server.apply(start, [upload])
        coefficients, bad = fleet.decode_signs(upload.payload, upload.steps, spec.m, "sign")
        ref = dict(start)
        for j in range(upload.steps):   # the reference replay, independent of the graph
            k = upload.round * upload.steps + j
            ref = ref if bad[j] else qzoff.replay(c, ref, coefficients[j], schedule.device_seed(device.index), k,
                                                  schedule.lr_at(k, upload.steps))
        summed = server.apply(start, [fleet.device_round(program, start, device, 1, schedule, "update")[0]])
        for s in program.contract.state:
            np.testing.assert_array_equal(replayed[s.name], own[s.name], err_msg=f"device {device.index} {s.name}")
            np.testing.assert_array_equal(ref[s.name], own[s.name], err_msg=f"reference, device {device.index}")
            np.testing.assert_array_equal(summed[s.name], own[s.name], err_msg=f"update, device {device.index}")
            moved += int((own[s.name] != start[s.name]).sum())
    assert moved > 0


def test_federated_applies_a_round_in_device_order(setup):
    compiled, program, devices = setup(TrainSpec(m=8))
    schedule = fleet.Schedule(rounds=2, local_epochs=1, batch=8, lr_numerator=2048, seed=0)
    server = fleet.Server(program.contract, compiled.train, schedule)
    forward, history = fleet.federated(program, server, devices, schedule, "signs")
    backward, _ = fleet.federated(program, server, devices, schedule, "signs",
                                  run_round=lambda t, r: [fleet.device_round(program, t, d, r, schedule, "signs")[0]
                                                          for d in reversed(devices)])
    by_hand = dict(program.initial)
    for uploads in history:   # one machine, the same signs: replayed one device after another
        for u in uploads:
            by_hand = server.replayed(by_hand, u)
    for s in program.contract.state:
        np.testing.assert_array_equal(forward[s.name], backward[s.name])
        np.testing.assert_array_equal(forward[s.name], by_hand[s.name])
    assert any((forward[s.name] != program.initial[s.name]).any() for s in program.contract.state)


def test_node_perturbation_uploads_its_update():
    contract = compile_graph(modelio.load_model(CNN), TrainSpec(estimator="node", last=2)).contract
    assert fleet.upload_kind(contract, "auto") == "update"
    with pytest.raises(SpecError, match="--upload signs: --estimator node"):
        fleet.upload_kind(contract, "signs")
