"""The compiled graph, run by onnxruntime, matches the independent numpy reference bit for bit."""
import dataclasses

import numpy as np
import pytest

from conftest import shipped
from fgcompile.spec import TrainSpec
from fgcompile.passes import branch_rules, formulas
from fgcompile.passes.pipeline import compile_graph
from reference import qzoff
from steps import Steps

STEPS = 20
BATCH = 32
SEED = 1000


def run_chain(model_file, spec, data, steps=STEPS, lr_schedule=None, calibration=None):
    """model_file: a shipped model's path or a ModelProto. The reference runs the compiler's canonical
    source (the input model itself unless canonicalize rewrote a dialect; test_dialects.py checks that
    both compute the same function)."""
    source = shipped(model_file) if isinstance(model_file, str) else model_file
    if spec.estimator == "auto":    # the reference here is weight perturbation's (auto: head or node by the depth)
        spec = dataclasses.replace(spec, estimator="sign")
    compiled = compile_graph(source, spec, calibration)
    c = qzoff.contract(compiled.train)
    oracle = qzoff.InferenceOracle(compiled.source, c, matrices=qzoff.matrices(compiled.train, c))
    for pre in c["precondition"]:   # the reference refits the preconditioned scale itself
        np.testing.assert_array_equal(np.asarray(pre["scale"], np.float32), oracle.scales[pre["weight"]].ravel())
    # the reference widens the source itself: the compiler's initial state must agree
    for name, value in compiled.state.items():
        np.testing.assert_array_equal(value, oracle.initial[name])
        assert value.dtype == oracle.initial[name].dtype
    run = Steps(compiled)
    x, y = data
    graph_state, ref_state = dict(compiled.state), dict(compiled.state)
    changed = 0
    for k in range(steps):
        idx = np.arange(k * BATCH, (k + 1) * BATCH) % len(y)
        lr = c["lr_numerator"]["default"] if lr_schedule is None else lr_schedule(k)
        out = run(x[idx], y[idx], SEED, k, lr, graph_state)
        ref_state, diag = qzoff.step(oracle, c, ref_state, x[idx], y[idx], SEED, k, lr)
        np.testing.assert_allclose(out["loss_plus"], diag["loss_plus"], rtol=1e-4)
        for s in c["state"]:
            new = out[s["output"]]
            assert new.dtype == ref_state[s["name"]].dtype
            np.testing.assert_array_equal(new, ref_state[s["name"]], err_msg=f"step {k} tensor {s['name']}")
            changed += int((new != graph_state[s["name"]]).sum())
        graph_state = {s["name"]: out[s["output"]] for s in c["state"]}
    assert changed > 0, "20 steps changed no weight: the comparison would be vacuous"
    return graph_state


@pytest.mark.parametrize("model_file", ["digits_cnn/w8a8.onnx", "digits_attn/w8a8.onnx"])
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("perturbation", ["rademacher", "ternary"])
@pytest.mark.parametrize("m", [1, 4])
def test_chain_matches_reference(model_file, bits, perturbation, m, target_train):
    density = 0.25 if perturbation == "ternary" else 1.0
    run_chain(model_file, TrainSpec(m=m, bits=bits, perturbation=perturbation, density=density), target_train)


@pytest.mark.parametrize("options", [
    dict(rounding="stochastic", lr=0.3),
    dict(perturbation="gaussian", m=2),
    dict(estimator="spsa", loss="mse", spsa_gain=4000.0),
    dict(last=2, estimator="sign", m=2),
    dict(lr_shift=0, lr=3.0),
])
def test_options_match_reference(options, target_train):
    run_chain("digits_cnn/w8a8.onnx", TrainSpec(**options), target_train, steps=8)


@pytest.mark.parametrize("model_file, options", [
    ("digits_cnn/w8a8.onnx", dict(last=3, estimator="sign", m=2, bits=8, headroom=1)),     # stacked: one wide trained Conv
    ("digits_cnn/w16a8.onnx", dict(last=4, estimator="sign", m=2)),                        # grouped Conv over stacked input
    ("digits_attn/w16a8.onnx", dict(last=8, estimator="sign", m=2)),                       # the whole transformer block
    ("digits_attn/w8a8.onnx", dict(train=("k.weight",), m=3)),           # one mid-block MatMul
    ("digits_cnn/w8a8.onnx", dict(last=3, m=2, bits=8, headroom=1, branches="loop")),  # a Loop over pairs
    ("digits_attn/w16a8.onnx", dict(last=8, m=2, branches="loop")),
])
def test_deep_suffixes_match_reference(model_file, options, target_train):
    run_chain(model_file, TrainSpec(**options), target_train, steps=6)


def test_native_int16_model_matches_reference(target_train):
    run_chain("digits_cnn/w16a8.onnx", TrainSpec(m=2), target_train, steps=10)


def test_lr_input_schedule_matches_reference(target_train):
    # the lr input changes per step (a schedule), including 0 (no update) and above lr_max (clipped)
    run_chain("digits_cnn/w8a8.onnx", TrainSpec(m=2), target_train, steps=6,
              lr_schedule=lambda k: [512, 0, 64, 2 ** 31 - 1, 7, 128][k])


@pytest.mark.parametrize("model_file,bits", [("digits_cnn/w8a8.onnx", 16), ("digits_attn/w8a8.onnx", 8),
                                             ("digits_cnn/w16a8.onnx", 16), ("digits_attn/w16a8.onnx", 16)])
@pytest.mark.parametrize("headroom", [1, 4])
def test_headroom_and_whitening_match_reference(model_file, bits, headroom, target_train):
    spec = TrainSpec(m=4, bits=bits, headroom=headroom, precondition="whiten")
    run_chain(model_file, spec, target_train, steps=6, calibration=target_train[0][:300])


@pytest.mark.parametrize("model_file,last,branches", [("digits_cnn/w8a8.onnx", 2, "auto"),
                                                      ("digits_cnn/w8a8.onnx", 2, "cloned"),
                                                      ("digits_cnn/w8a8.onnx", 2, "loop"),
                                                      ("digits_attn/w8a8.onnx", 3, "auto")])
def test_whitening_with_deeper_sites_matches_reference(model_file, last, branches, target_train):
    """Every trained Gemm/MatMul is whitened, also one downstream of another trained weight: there the
    frozen whitening MatMul sits between two trained sites, inside the suffix the branches rewrite, and
    every branch form must carry it (before pair sorted the suffix, the stacked Gemm read the unbranched
    tensor and the compile failed validation with a dangling 'precondition/whitened' tensor)."""
    spec = TrainSpec(m=4, last=last, estimator="sign", precondition="auto", branches=branches)
    compiled = compile_graph(shipped(model_file), spec, target_train[0][:300])
    pre = qzoff.contract(compiled.train)["precondition"]
    weights = [s["name"] for s in qzoff.contract(compiled.train)["state"] if s["role"] == "weight"]
    assert len(weights) >= 2 and [p["weight"] for p in pre] == weights
    run_chain(model_file, spec, target_train, steps=6, calibration=target_train[0][:300])


@pytest.mark.parametrize("model_file,options", [
    ("digits_cnn/w8a8.onnx", dict(kernel_norm=True)),
    ("digits_attn/w8a8.onnx", dict(kernel_norm=True, last=2, estimator="sign")),             # per-channel on axis 1 (MatMul)
    ("digits_cnn/w8a8.onnx", dict(sparsity=0.9)),                          # topk
    ("digits_cnn/w8a8.onnx", dict(sparsity=0.5, sparse_mode="random", last=2, estimator="sign")),
    ("digits_attn/w8a8.onnx", dict(sparsity=0.5, sparse_mode="threshold", estimator="spsa", spsa_gain=4000.0)),
    ("digits_cnn/w8a8.onnx", dict(sparsity=0.75, kernel_norm=True, rounding="stochastic", bits=8)),
    ("digits_cnn/w8a8.onnx", dict(momentum=0.5)),
    ("digits_attn/w8a8.onnx", dict(momentum=0.25, last=2, estimator="sign")),
    ("digits_cnn/w8a8.onnx", dict(sharpness=16)),                         # ρ = ε
    ("digits_attn/w16a8.onnx", dict(sharpness=8, momentum=0.5, kernel_norm=True, sparsity=0.5)),
    ("digits_cnn/w8a8.onnx", dict(last=3, bits=8, headroom=1, branches="loop", sharpness=1, momentum=0.25)),
])
def test_enhancements_match_reference(model_file, options, target_train):
    """The paper's four enhancements, alone and together (momentum-guided sampling and the sharpness-aware
    ascent carry an int32 momentum buffer as state, compared too): bit for bit."""
    run_chain(model_file, TrainSpec(m=4, **options), target_train, steps=6)


@pytest.mark.parametrize("options", [
    dict(last=3, estimator="sign"),                                                  # int16 weights moved in their own dtype
    dict(last=3, estimator="spsa", loss="mse", spsa_gain=4000.0),  # ĝ carried in int16
    dict(last=2, estimator="sign", perturbation="gaussian"),                         # |z| <= 4
    dict(last=2, estimator="sign", rounding="stochastic", lr=0.3),
    dict(last=3, estimator="sign", bits=8, headroom=1, kernel_norm=True, sparsity=0.5),
    dict(last=3, estimator="sign", eps=200),                                         # ε·z beyond int8: the int32 perturbation
    dict(last=3, estimator="sign", momentum=0.5),                                    # guided zᵢ: pieces sliced from the whole
])
def test_loop_form_matches_reference(options, target_train, monkeypatch):
    """The loop form's narrow arithmetic (int8 zᵢ, weights moved in their own dtype, ĝ in int8/int16, the
    trained Conv dequantized a piece of output channels at a time, the update in row chunks) gives the
    reference's bits. PIECE and CHUNK shrink so that digits_cnn's conv2 and fc1 take the pieces and chunks
    that ResNet-18's layer4 convs take at the defaults."""
    monkeypatch.setattr(branch_rules, "PIECE", 1000)
    monkeypatch.setattr(formulas, "CHUNK", 1000)
    spec = TrainSpec(m=4, branches="loop", **options)
    if spec.last == 3 and spec.eps is None:
        body = next(a.g for n in compile_graph(shipped("digits_cnn/w8a8.onnx"), spec).train.graph.node
                    if n.op_type == "Loop" for a in n.attribute if any(x.op_type == "Conv" for x in a.g.node))
        assert [n.op_type for n in body.node].count("Conv") == 8      # conv2 (4608 weights) in 8 pieces
    run_chain("digits_cnn/w8a8.onnx", spec, target_train, steps=6)


@pytest.mark.parametrize("model_file,options", [
    ("digits_cnn/w8a8.onnx", dict(last=3, estimator="sign")),                                      # int16 conv2, fc1
    ("digits_cnn/w8a8.onnx", dict(last=3, bits=8, headroom=1, estimator="spsa", spsa_gain=4000.0)),  # int8 W
    ("digits_cnn/w8a8.onnx", dict(last=2, perturbation="gaussian", branches="cloned")),
    ("digits_attn/w8a8.onnx", dict(last=7, estimator="sign")),                                     # the whole block and head
])
def test_stacked_narrow_perturbation_matches_reference(model_file, options, target_train, monkeypatch):
    """The stacked and cloned forms perturb a large tensor in its own dtype (int8 steps saturated to the
    grid's ends, one widening, the Add) and sum ĝ with MatMulInteger on the int8 zᵢ: the reference's bits.
    CHUNK shrinks so that the digits models' tensors take that path, as ResNet-18's convs do."""
    monkeypatch.setattr(formulas, "CHUNK", 1000)
    spec = TrainSpec(m=4, **options)
    graph = compile_graph(shipped(model_file), spec).train.graph
    assert any(n.op_type == "Max" and "/moved_" in n.name for n in graph.node), "no narrow perturbation"
    run_chain(model_file, spec, target_train, steps=6)


@pytest.mark.parametrize("branches", ["stacked", "cloned", "auto"])
@pytest.mark.parametrize("chunk", [1000, formulas.CHUNK])
def test_pointwise_convs_match_reference(branches, chunk, monkeypatch):
    """The keyword spotter's last block (a depthwise and a 1x1 pointwise Conv, kernel [64, 64, 1, 1], and
    the classifier): arithmetic on the kernels runs on views without their trailing size-1 axes
    (formulas.compute_shape), in each branch form, in the int32 and (CHUNK shrunk) the narrow path."""
    from conftest import MODELS
    from fgcompile.runtime.data import load_data
    monkeypatch.setattr(formulas, "CHUNK", chunk)
    data = load_data(MODELS / "data" / "kws_target_train.npz")
    run_chain("kws_dscnn/w8a8.onnx", TrainSpec(m=4, last=3, estimator="sign", branches=branches), data, steps=4)
