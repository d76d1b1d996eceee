"""The stacked suffix (one node per original node, branches on a leading axis) computes the same step
as one clone of the suffix per branch, and is the form the shipped models' trained layers get."""
import dataclasses

import numpy as np
import onnx
import pytest

from conftest import shipped
from fgcompile.errors import CompileError
from fgcompile.passes import branch_rules, formulas
from fgcompile.passes.pipeline import compile_graph
from fgcompile.spec import TrainSpec
from reference import qzoff
from steps import Steps


def _cloned(model, spec):
    return compile_graph(model, dataclasses.replace(spec, branches="cloned"))


@pytest.mark.parametrize("model_file, spec", [
    ("digits_cnn/w8a8.onnx", TrainSpec(m=4)),                       # wide Gemm, bias folded in
    ("digits_cnn/w8a8.onnx", TrainSpec(m=3, last=2, estimator="sign", bits=8)),  # fc1 -> Relu -> Q/DQ -> fc2, int8
    ("digits_attn/w16a8.onnx", TrainSpec(m=4, last=2, estimator="sign")),              # MatMul, Q/DQ, Add, ReduceMean?
    ("digits_attn/w8a8.onnx", TrainSpec(m=2, include_bias=False, perturbation="gaussian")),
    ("digits_cnn/w8a8.onnx", TrainSpec(m=2, last=3, estimator="sign", bits=8)),  # trained conv2: one wide Conv, then folded
    ("digits_cnn/w16a8.onnx", TrainSpec(m=3, last=4, estimator="sign")),  # conv1 too: conv2 becomes a grouped Conv
    ("digits_attn/w16a8.onnx", TrainSpec(m=2, last=8, estimator="sign")),  # the whole block: attention, LayerNorm
    ("digits_attn/w8a8.onnx", TrainSpec(m=2, train=("q.weight",))),  # one mid-block MatMul, frozen rest folded
])
def test_stacked_equals_cloned(model_file, spec, target_train):
    _assert_same_steps(shipped(model_file), spec, target_train)


@pytest.mark.parametrize("model_file, spec", [
    ("digits_cnn/w8a8.onnx", TrainSpec(m=3, last=3, estimator="sign", bits=8)),  # a trained Conv inside the Loop body
    ("digits_attn/w16a8.onnx", TrainSpec(m=2, last=8, estimator="sign")),              # the transformer block
    ("digits_cnn/w8a8.onnx", TrainSpec(m=2, train=("conv2.weight",), bits=8)),   # frozen fc1, fc2 in the body
    ("digits_attn/w8a8.onnx", TrainSpec(m=2, train=("q.weight",))),  # one mid-block MatMul, frozen rest
])
def test_loop_equals_cloned(model_file, spec, target_train):
    _assert_same_steps(shipped(model_file), dataclasses.replace(spec, branches="loop"), target_train)


@pytest.mark.parametrize("spec", [
    TrainSpec(m=3, last=2, estimator="sign", bits=8),  # fc2's A and bias stacked: Gemm -> MatMul, Mul(α), Add(β·C)
    TrainSpec(m=2, include_bias=False),         # wide fc2, frozen bias added after as β·C
])
def test_gemm_alpha_beta_stack_like_clones(spec, target_train):
    model = shipped("digits_cnn/w8a8.onnx")
    for node in model.graph.node:
        if node.op_type == "Gemm":
            node.attribute.extend([onnx.helper.make_attribute("alpha", 1.5),
                                   onnx.helper.make_attribute("beta", 0.5)])
    _assert_same_steps(model, spec, target_train)


def _assert_same_steps(model, spec, target_train):
    stacked, cloned = compile_graph(model, spec), _cloned(model, spec)
    assert qzoff.contract(stacked.train)["branches"] == ("loop" if spec.branches == "loop" else "stacked")
    assert qzoff.contract(cloned.train)["branches"] == "cloned"
    assert len(stacked.train.graph.node) < len(cloned.train.graph.node)
    runs = [Steps(c) for c in (stacked, cloned)]
    x, y = target_train
    state = [dict(stacked.state), dict(cloned.state)]
    changed = 0
    for k in range(6):
        idx = np.arange(k * 32, (k + 1) * 32)
        outs = [run(x[idx], y[idx], 0, k, 256, state[i]) for i, run in enumerate(runs)]
        # a wide or grouped float Conv may sum in another order than 2m small ones: an activation on a
        # rounding edge of the next requantization can land one LSB apart, so losses agree to 1e-3
        np.testing.assert_allclose(outs[0]["loss_plus"], outs[1]["loss_plus"], rtol=1e-3)
        np.testing.assert_allclose(outs[0]["loss_minus"], outs[1]["loss_minus"], rtol=1e-3)
        for s in qzoff.contract(stacked.train)["state"]:
            np.testing.assert_array_equal(outs[0][s["output"]], outs[1][s["output"]], err_msg=f"step {k} {s['name']}")
            changed += int((outs[0][s["output"]] != state[0][s["name"]]).sum())
        state = [{s["name"]: o[s["output"]] for s in qzoff.contract(stacked.train)["state"]} for o in outs]
    assert changed > 0


def test_a_trained_conv_runs_its_kernels_on_the_folded_batch():
    compiled = compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(m=2, last=3, estimator="sign", forward="qdq"))
    contract = qzoff.contract(compiled.train)
    assert contract["branches"] == "stacked" and contract["branches_reason"] is None
    ops = [n.op_type for n in compiled.train.graph.node]
    # frozen conv1, conv2 once per branch kernel; everything after it once, on the folded batch
    assert ops.count("Conv") == 1 + 2 * 2 and ops.count("Flatten") == 1


def _with_einsum(model):
    """digits_cnn with an identity Einsum (an op branch_rules has no rule for) on fc1's output."""
    k, fc1 = next((k, n) for k, n in enumerate(model.graph.node) if n.output[0] == "relu3")
    fc1.output[0] = "relu3_pre"
    model.graph.node.insert(k + 1, onnx.helper.make_node("Einsum", ["relu3_pre"], ["relu3"], equation="ij->ij"))
    return model


def test_an_op_without_a_rule_falls_back_to_clones_and_says_why():
    model = _with_einsum(shipped("digits_cnn/w8a8.onnx"))
    compiled = compile_graph(model, TrainSpec(m=2, last=2, estimator="sign"))
    contract = qzoff.contract(compiled.train)
    assert contract["branches"] == "cloned" and "Einsum" in contract["branches_reason"]
    assert "no branch-axis rule for this op" in contract["branches_reason"]   # the refusal's reason
    assert sum(n.op_type == "Einsum" for n in compiled.train.graph.node) == 2 * 2
    with pytest.raises(CompileError, match="--branches stacked.*Einsum"):
        compile_graph(model, TrainSpec(m=2, last=2, estimator="sign", branches="stacked"))


def test_memory_budget_makes_auto_pick_the_loop():
    model = shipped("digits_cnn/w8a8.onnx")
    roomy = compile_graph(model, TrainSpec(m=4, last=3, estimator="sign", memory_budget_mb=1000))
    tight = compile_graph(model, TrainSpec(m=4, last=3, estimator="sign", memory_budget_mb=0.05))
    assert roomy.contract.branches == "stacked"
    assert tight.contract.branches == "loop" and "--memory-budget" in tight.contract.branches_reason
    assert any(n.op_type == "Loop" for n in tight.train.graph.node)


def test_auto_clones_a_wide_suffix_and_stacks_a_small_one(monkeypatch):
    """auto: the keyword spotter's last block (6240 activation values per example) runs one suffix copy per
    branch and says why; its last layer alone stays stacked; past the frozen-weight cap it stays stacked."""
    from fgcompile.passes import pair
    model = shipped("kws_dscnn/w8a8.onnx")
    wide = compile_graph(model, TrainSpec(m=2, last=3, estimator="sign")).contract
    assert wide.branches == "cloned" and "values per example" in wide.branches_reason
    assert compile_graph(model, TrainSpec(m=2, last=1)).contract.branches == "stacked"
    monkeypatch.setattr(pair, "CLONE_WEIGHTS", 0)
    capped = compile_graph(model, TrainSpec(m=2, last=3, estimator="sign")).contract
    assert capped.branches == "stacked" and capped.branches_reason is None


def _perturbation_sized(compiled, m: int) -> list[str]:
    """Tensors of the main graph shaped [m or 2m, *shape] of a trained tensor (all perturbations at once)."""
    model = onnx.shape_inference.infer_shapes(compiled.train)
    sized = {tuple([k] + list(s.shape)) for s in compiled.contract.state for k in (m, 2 * m)}
    return [v.name for v in model.graph.value_info
            if tuple(d.dim_value for d in v.type.tensor_type.shape.dim) in sized]


def test_loop_draws_each_perturbation_inside_the_loop():
    """The memory-bounded form holds one zᵢ at a time: no [m, *shape] z or [2m, *shape] weights outside
    its Loops (the stacked form has them, so the check can fail), and no z probe to materialize."""
    model, spec = shipped("digits_cnn/w8a8.onnx"), TrainSpec(m=3, last=3, estimator="sign", bits=8)
    looped = compile_graph(model, dataclasses.replace(spec, branches="loop"))
    assert _perturbation_sized(compile_graph(model, spec), 3)
    assert _perturbation_sized(looped, 3) == []
    assert [n.op_type for n in looped.train.graph.node].count("Loop") == 2
    assert looped.contract.probes.z == []


def test_loop_dequantizes_frozen_weights_inside_its_body():
    """The suffix's frozen weights stay int8 initializers of the Loop body, dequantized there, so
    onnxruntime fuses their ops to int8 kernels; dequantized outside, they would reach the body as float
    tensors (4 bytes per parameter) and run in float."""
    compiled = compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(m=2, train=("conv2.weight",),
                                                                        branches="loop", forward="qdq"))
    graph = compiled.train.graph
    body = next(a.g for n in graph.node if n.op_type == "Loop" for a in n.attribute if a.name == "body"
                and any(x.op_type == "Gemm" or x.op_type == "MatMul" for x in a.g.node))
    frozen = {"fc1.weight_quantized", "fc2.weight_quantized"}
    assert frozen <= {i.name for i in body.initializer}
    assert not frozen & {i for n in graph.node for i in n.input}


def test_loop_holds_no_wide_copy_of_a_large_weight(monkeypatch):
    """The memory-bounded form keeps no int32 or float tensor the size of a large trained Conv weight, in
    its main graph or its Loop bodies: W ± εzᵢ is formed in the weight's int16, its float kernel and ĝ
    are made a piece of rows at a time. PIECE and CHUNK shrink so that digits_cnn's conv2 (4608 weights)
    counts as large; the stacked form (every zᵢ and perturbed copy in int32) fails the same check. (A
    trained Gemm/MatMul weight still has its whole float copy in the body: fc1 here.)"""
    monkeypatch.setattr(branch_rules, "PIECE", 1000)
    monkeypatch.setattr(formulas, "CHUNK", 1000)
    spec = TrainSpec(m=4, last=3, estimator="sign")

    def wide(compiled):
        large = {int(np.prod(s.shape)) for s in compiled.contract.state if len(s.shape) == 4}
        found = []

        def walk(graph):
            for v in graph.value_info:
                t = v.type.tensor_type
                dims = [d.dim_value for d in t.shape.dim]
                if t.elem_type in (onnx.TensorProto.INT32, onnx.TensorProto.FLOAT) and all(dims) and \
                        int(np.prod(dims)) in large:
                    found.append(v.name)
            for node in graph.node:
                for a in node.attribute:
                    if a.type == onnx.AttributeProto.GRAPH:
                        walk(a.g)
        walk(onnx.shape_inference.infer_shapes(compiled.train).graph)
        return found
    model = shipped("digits_cnn/w8a8.onnx")
    assert wide(compile_graph(model, spec))
    assert wide(compile_graph(model, dataclasses.replace(spec, branches="loop"))) == []
