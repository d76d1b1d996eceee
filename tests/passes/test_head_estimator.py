"""--estimator head (passes/head.py): the exact gradient at the logits. Chained steps match the numpy
reference (qzoff.head_step) bit for bit, its V is the reference's rounding of softmax − onehot, its step
descends the loss, and what it does not train is refused by name."""
import numpy as np
import pytest

from conftest import shipped
from fgcompile import models
from fgcompile.errors import SpecError
from fgcompile.passes.pipeline import compile_graph
from fgcompile.spec import TrainSpec
from reference import qzoff
from steps import Steps
from test_node_estimator import run_chain as node_chain

BATCH, SEED = 32, 1000


def run_chain(model, spec, data, steps, optimization="disable", calibration=None):
    """test_node_estimator's chain against qzoff.head_step; the head's L⁺ and L⁻ are its one clean loss."""
    return node_chain(model, spec, data, steps, optimization, calibration,
                      whitened=0 if calibration is None else 1, reference=qzoff.head_step)


@pytest.mark.parametrize("optimization", ["disable", "all"])
@pytest.mark.parametrize("model,options", [
    ("digits_cnn/w8a8.onnx", {}),                        # fc2: Gemm transB, int16 training grid
    ("digits_cnn/w16a8.onnx", {}),
    ("digits_cnn/w8a8.onnx", dict(bits=8, headroom=1)),   # on the int8 grid
    ("digits_attn/w8a8.onnx", {}),                        # the head MatMul
    ("digits_cnn/w8a8.onnx", dict(rounding="stochastic")),
])
def test_head_chain_matches_reference(model, options, optimization, target_train):
    assert run_chain(model, TrainSpec(estimator="head", **options), target_train, 5, optimization) > 0


@pytest.mark.parametrize("optimization", ["disable", "all"])
@pytest.mark.parametrize("model", ["digits_cnn/w8a8.onnx", "digits_attn/w16a8.onnx"])
def test_whitened_head_chain_matches_reference(model, optimization, target_train):
    """With calibration the step is whitened as node's (a' = quantize(a·P², s)); the weights keep their grid."""
    assert run_chain(model, TrainSpec(estimator="head"), target_train, 5, optimization,
                     calibration=target_train[0][:300]) > 0


@pytest.mark.parametrize("name,loss", [("kws_dscnn", "ce"), ("kws_detect", "bce")])
def test_head_chain_on_the_keyword_models(name, loss):
    """The keyword spotter's classifier (ce) and the wake-word detector's Sigmoid head (bce: σ(z) − y)."""
    compiled = compile_graph(shipped(f"{name}/w8a8.onnx"), TrainSpec(estimator="head"))
    assert compiled.contract.spec.loss == loss
    assert run_chain(f"{name}/w8a8.onnx", TrainSpec(estimator="head"), models.split(name, "target_train"), 3) > 0


def test_head_step_descends_the_loss(target_train):
    """The exact gradient at a small rate lowers the batch's own loss in one step, every time (a weight
    perturbation estimate would not, at m = 1); L⁺ = L⁻ = the batch's loss."""
    compiled = compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(estimator="head", lr=2 ** -8))
    run = Steps(compiled)
    x, y = target_train
    for k in range(5):
        idx = np.arange(k * BATCH, (k + 1) * BATCH)
        out = run(x[idx], y[idx], SEED, 0, compiled.contract.lr_numerator.default, compiled.state)
        after = run(x[idx], y[idx], SEED, 0, 0, {s.name: out[s.output] for s in compiled.contract.state})
        assert after["loss"] < out["loss"] and out["loss_plus"] == out["loss_minus"] == out["loss"]


@pytest.mark.parametrize("options,named", [
    (dict(last=2), "2 layers train"),
    (dict(train=("fc1",)), "does not write the logits"),
    (dict(train=("conv2",)), "is a Conv"),
    (dict(loss="mse"), "--loss mse"),
    (dict(momentum=0.5), "--momentum"),
    (dict(branches="loop"), "--branches loop"),
    (dict(m=4), "--m 4"),
])
def test_head_refuses_what_it_does_not_train(options, named):
    with pytest.raises(SpecError, match="--estimator head|--m 4") as err:
        compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(estimator="head", **options))
    assert named in str(err.value)


def test_head_is_not_replayable_and_holds_no_z():
    from fgcompile.runtime.replay import replayable
    compiled = compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(estimator="head"))
    assert compiled.contract.probes.z == [] and compiled.contract.branches == "none"
    assert "--estimator head" in replayable(compiled.contract)
