"""Inside the trained suffix the branches read an activation Q→DQ pair as float (requant_bypass): the
transformer's classifier requantizes its MatMul output before the bias Add, and on that uint8 grid a
±ε weight step mostly vanishes. The eval graph (the deployed function) keeps the requantization."""
import numpy as np

from conftest import shipped
from fgcompile.passes.pipeline import compile_graph
from fgcompile.spec import TrainSpec
from reference import qzoff
from steps import run_step


def _ops_after_trained(model, trained):
    reached, ops = set(trained), []
    for node in model.graph.node:
        if any(i in reached for i in node.input):
            reached.update(node.output)
            ops.append(node.op_type)
    return ops


def test_branches_skip_requant_and_eval_keeps_it():
    source = shipped("digits_attn/w16a8.onnx")
    on, off = (compile_graph(source, TrainSpec(m=2, requant_bypass=b)) for b in (True, False))
    state = [s["name"] for s in qzoff.contract(on.train)["state"]]
    # the branches of the default graph hold no QuantizeLinear; with --keep-requant they do
    assert "QuantizeLinear" not in _ops_after_trained(on.train, state)
    assert "QuantizeLinear" in _ops_after_trained(off.train, state)
    assert "QuantizeLinear" in _ops_after_trained(on.eval, state)

def _d(source, x, y, **spec):
    out = run_step(compile_graph(source, TrainSpec(m=8, **spec)), x, y, seed=0, step=0, lr_numerator=0)
    return out["loss_plus"] - out["loss_minus"]


def test_without_requant_the_loss_difference_is_a_directional_derivative(target_train):
    """Same seed, so the same z: doubling ε doubles d when the branches are smooth in W. Through the
    uint8 requantization d is noise: its sign can even flip (measured: ratios from −22.5 to 1.4)."""
    source = shipped("digits_attn/w16a8.onnx")
    x, y = target_train[0][:64], target_train[1][:64]
    ratio = _d(source, x, y, eps=32) / _d(source, x, y, eps=16)
    np.testing.assert_allclose(ratio, 2.0, rtol=0.05)
    kept = _d(source, x, y, eps=32, requant_bypass=False) / _d(source, x, y, eps=16, requant_bypass=False)
    assert np.abs(kept - 2.0).max() > 0.5


def test_at_depth_only_the_pairs_after_the_last_weighted_op_are_bypassed():
    """Training deeper, the inner requantizations stay (they let onnxruntime run the frozen ops as int8
    kernels): on the transformer's block (--last 7) the bypass reads exactly one pair as float, the
    classifier's; the CNN has none after its last Gemm, so its deep graphs are the same both ways
    (benchmarks/run.py's --keep-requant rows at depth measure this)."""
    attn = shipped("digits_attn/w16a8.onnx")
    on, off = (compile_graph(attn, TrainSpec(m=2, last=7, estimator="sign", requant_bypass=b)).train for b in (True, False))
    count = lambda model, op: sum(n.op_type == op for n in model.graph.node)
    assert count(off, "QuantizeLinear") - count(on, "QuantizeLinear") == 1
    assert count(off, "DequantizeLinear") - count(on, "DequantizeLinear") == 1
    assert count(on, "QuantizeLinear") > 1     # the inner activation pairs of the block are still there
    cnn = shipped("digits_cnn/w16a8.onnx")
    on, off = (compile_graph(cnn, TrainSpec(m=2, last=3, estimator="sign", requant_bypass=b)).train for b in (True, False))
    assert on.graph == off.graph
