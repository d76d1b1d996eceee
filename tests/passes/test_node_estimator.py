"""--estimator node (passes/node.py): chained steps match the numpy reference (qzoff.node_step) bit for bit,
its parts match the reference's formulas, and what it does not support yet is refused by name."""
import numpy as np
import pytest

from conftest import shipped
from fgcompile.errors import SpecError
from fgcompile.passes.pipeline import compile_graph
from fgcompile.passes.precondition import STEP_RIDGE
from fgcompile.spec import TrainSpec, lr_grid
from reference import qzoff
from steps import Steps

BATCH, SEED = 32, 1000


def run_chain(model_file, spec, data, steps, optimization="disable", calibration=None, whitened=None,
              reference=qzoff.node_step, lr=None):
    """Chained steps of the compiled graph and of the reference (node_step, or head_step) from the same
    state: the coefficients (the per-example signs, or the head's V) and every state tensor equal after every
    step; returns how many weight values the steps changed (so the test is not vacuous).
    whitened: how many sites whiten their step (default: every trained site with precondition whiten).
    lr: the rate numerator of every step (default: the contract's)."""
    compiled = compile_graph(shipped(model_file), spec, calibration)
    c = qzoff.contract(compiled.train)
    if whitened is None:
        whitened = len(qzoff.node_layers(compiled.source, c)) if spec.precondition == "whiten" else 0
    assert len(c["step_whitening"]) == whitened
    oracle = qzoff.node_oracle(compiled.source, c, optimized=optimization == "all",
                               matrices=qzoff.matrices(compiled.train, c))
    coefficients = compiled.contract.probes.coefficients      # one thread, as the oracle (node_oracle says why)
    run = Steps(compiled, optimization=optimization, threads=1, probes=[coefficients])
    graph_state, ref_state, changed = dict(compiled.state), dict(compiled.state), 0
    x, y = data
    for k in range(steps):
        idx = np.arange(k * BATCH, (k + 1) * BATCH) % len(y)
        lr = c["lr_numerator"]["default"] if lr is None else lr
        out = run(x[idx], y[idx], SEED, k, lr, graph_state)
        ref_state, diag = reference(oracle, c, ref_state, x[idx], y[idx], SEED, k, lr)
        np.testing.assert_allclose(out["loss_plus"], diag["loss_plus"], rtol=1e-5)
        np.testing.assert_array_equal(out[coefficients], diag["coef"], err_msg=f"step {k} coefficients")
        for s in c["state"]:
            np.testing.assert_array_equal(out[s["output"]], ref_state[s["name"]], err_msg=f"step {k} {s['name']}")
            changed += int((out[s["output"]] != graph_state[s["name"]]).sum())
        graph_state = {s["name"]: out[s["output"]] for s in c["state"]}
    return changed


@pytest.mark.parametrize("optimization", ["disable", "all"])
@pytest.mark.parametrize("model_file,options", [
    ("digits_cnn/w8a8.onnx", dict(last=2)),                       # fc1 + fc2: Gemm transB, fc2's output is the tap
    ("digits_cnn/w16a8.onnx", dict(last=2)),
    ("digits_cnn/w8a8.onnx", dict(last=2, bits=8, headroom=1)),   # on the int8 grid
    ("digits_attn/w8a8.onnx", dict(last=3)),                      # mlp1, mlp2, head: MatMul on [B, T, D] tokens
    ("digits_cnn/w8a8.onnx", dict(last=3)),                       # conv2 (stride 2, pads 1) + fc1 + fc2
    ("digits_cnn/w8a8.onnx", dict(last=4)),                       # every layer: conv1 reads the quantized image
    ("digits_cnn/w16a8.onnx", dict(last=3)),
    ("digits_cnn/w8a8.onnx", dict(last=4, bits=16)),              # widened to the int16 grid
    ("digits_cnn/w8a8.onnx", dict(last=3, node_schedule="alternate")),   # direction i: layer i mod 3
])
def test_node_chain_matches_reference(model_file, options, optimization, target_train):
    spec = TrainSpec(estimator="node", m=4, **options)
    assert run_chain(model_file, spec, target_train, steps=5, optimization=optimization) > 0


@pytest.mark.parametrize("optimization", ["disable", "all"])
@pytest.mark.parametrize("model_file,options", [
    ("digits_cnn/w8a8.onnx", dict(last=2)),
    ("digits_attn/w16a8.onnx", dict(last=3)),
    ("digits_cnn/w8a8.onnx", dict(last=3)),                       # conv2's im2col patches whitened
    ("digits_cnn/w16a8.onnx", dict(last=4)),
    ("digits_cnn/w8a8.onnx", dict(last=4, node_schedule="alternate")),
])
def test_whitened_node_chain_matches_reference(model_file, options, optimization, target_train):
    """With calibration the step is preconditioned, a' = quantize(a·P², s): the weights keep their grid."""
    spec = TrainSpec(estimator="node", m=4, precondition="whiten", **options)
    assert run_chain(model_file, spec, target_train, steps=5, optimization=optimization,
                     calibration=target_train[0][:300]) > 0


@pytest.mark.parametrize("optimization", ["disable", "all"])
@pytest.mark.parametrize("model_file,options", [
    ("digits_cnn/w8a8.onnx", dict(last=3)),                       # conv2's patches, fc1, the exact fc2
    ("digits_attn/w8a8.onnx", dict(last=3)),                      # tokens
    ("digits_cnn/w8a8.onnx", dict(last=4, node_schedule="alternate", precondition="whiten")),
])
def test_node_loop_form_matches_reference(model_file, options, optimization, target_train):
    """--branches loop: one branch at a time in an ONNX Loop, the same steps as the reference (which has
    no form) and so as the stacked branches."""
    spec = TrainSpec(estimator="node", m=4, branches="loop", **options)
    calibration = target_train[0][:300] if options.get("precondition") == "whiten" else None
    assert run_chain(model_file, spec, target_train, steps=5, optimization=optimization, calibration=calibration) > 0


@pytest.mark.parametrize("estimator,options", [
    ("node", dict(last=3)), ("node", dict(last=3, branches="loop")), ("head", dict(last=1))])
def test_the_top_rate_saturates_the_gradient_as_the_reference(estimator, options, target_train):
    """Node and head have no static lr_max: at the top numerator (2^20 − 1) the update saturates ĝ to
    ±(2^31 − 1 − 2^16) // (2^20 − 1) = ±2047 first, as the reference does, and nothing wraps (at shift 16 a
    saturated ĝ moves a weight 2^15 LSBs, inside the 16-bit grid, so the saturation shows in the state)."""
    spec = TrainSpec(estimator=estimator, lr_shift=16, **({"m": 4} if estimator == "node" else {}), **options)
    top = compile_graph(shipped("digits_cnn/w8a8.onnx"), spec).contract.lr_numerator.max
    assert top == 2 ** 20 - 1
    reference = qzoff.node_step if estimator == "node" else qzoff.head_step
    assert run_chain("digits_cnn/w8a8.onnx", spec, target_train, steps=3, reference=reference, lr=top) > 0


@pytest.mark.parametrize("model_file,options", [
    ("digits_cnn/w8a8.onnx", dict(last=3, precondition="whiten")),   # conv2 [out, in...], fc1, fc2 by output rows
    ("digits_attn/w8a8.onnx", dict(last=3)),                          # mlp1, mlp2, head [in, out]: by input rows
])
def test_node_loop_form_steps_large_weights_a_chunk_at_a_time(model_file, options, target_train, monkeypatch):
    """In the loop form a weight over formulas.CHUNK elements gets its ĝ a chunk of rows at a time inside the
    update's Loop, so neither ĝ nor its int32 temporaries exist whole, the output layer's exact gradient too
    (CHUNK shrinks here so the shipped layers take that path, as ResNet-18's and MobileNetV2's do): the same
    steps as the reference."""
    from fgcompile.passes import formulas
    monkeypatch.setattr(formulas, "CHUNK", 300)
    spec = TrainSpec(estimator="node", m=4, branches="loop", **options)
    compiled = compile_graph(shipped(model_file), spec, target_train[0][:300] if "precondition" in options else None)
    chunked_updates = [n for n in compiled.train.graph.node if n.op_type == "Loop" and n.name.startswith("update/")
                       and any(x.op_type == "MatMulInteger" for x in n.attribute[0].g.node)]
    assert len(chunked_updates) == 3
    calibration = target_train[0][:300] if "precondition" in options else None
    assert run_chain(model_file, spec, target_train, steps=4, calibration=calibration) > 0


def test_node_loop_form_on_the_keyword_spotter():
    """Depthwise and pointwise Convs in the Loop body; its frozen weights dequantized inside it."""
    from fgcompile import models
    spec = TrainSpec(estimator="node", m=2, last=3, branches="loop", forward="qdq")   # the QDQ ops as given
    compiled = compile_graph(shipped("kws_dscnn/w8a8.onnx"), spec)
    loop = next(n for n in compiled.train.graph.node if n.op_type == "Loop")
    assert any(n.op_type == "DequantizeLinear" for n in loop.attribute[0].g.node)
    assert run_chain("kws_dscnn/w8a8.onnx", spec, models.split("kws_dscnn", "target_train"), steps=3) > 0


def test_node_trains_only_the_named_mlp(target_train):
    """mlp1 and mlp2 of the transformer, the head frozen after them: the noise of mlp2 reaches the loss
    through the frozen head, and the clean input of mlp2 comes from the unperturbed copy."""
    spec = TrainSpec(estimator="node", m=3, train=("mlp1", "mlp2"))
    assert run_chain("digits_attn/w8a8.onnx", spec, target_train, steps=4) > 0


def test_node_noise_and_gradient_parts(target_train):
    """One step's per-example signs are the reference's, and the graph's ĝ is Σ_b a_b ⊗ V_b of the
    reference's formulas (through the update at rate 1 with shift 0: W − ĝ, unsaturated)."""
    spec = TrainSpec(estimator="node", m=2, last=2, lr_shift=0, lr=1.0, bits=16)
    compiled = compile_graph(shipped("digits_cnn/w8a8.onnx"), spec)
    c = qzoff.contract(compiled.train)
    x, y = target_train[0][:BATCH], target_train[1][:BATCH]
    out = Steps(compiled, probes=[compiled.contract.probes.coefficients])(x, y, SEED, 0, 1)
    _, diag = qzoff.node_step(qzoff.node_oracle(compiled.source, c), c, dict(compiled.state), x, y, SEED, 0, 1)
    np.testing.assert_array_equal(out[compiled.contract.probes.coefficients], diag["coef"])
    assert compiled.contract.probes.z == [] and out[compiled.contract.probes.coefficients].shape == (2, BATCH)
    assert np.abs(diag["coef"]).sum() > BATCH     # most examples have a nonzero sign


@pytest.mark.parametrize("options,named", [
    (dict(last=2, branches="cloned"), "--branches cloned"),
    (dict(last=2, perturbation="ternary", density=0.5), "--perturbation ternary"),
    (dict(last=2, momentum=0.5), "--momentum"),
])
def test_node_refuses_what_it_does_not_support(options, named):
    with pytest.raises(SpecError, match="--estimator node") as err:
        compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(estimator="node", m=2, **options))
    assert named in str(err.value)


def test_node_whitens_its_step_by_default(target_train):
    """--precondition auto with calibration whitens node's step (ΔW ∝ P²·ĝ_W): the weight is not
    reparametrized, and P is taken at the step's ridge (at weight perturbation's 1e-3, cond P² was 54,000)."""
    compiled = compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(estimator="node", m=2, last=1),
                             target_train[0][:300])
    (entry,) = compiled.contract.step_whitening
    assert compiled.contract.precondition == [] and entry.site == "logits"
    found = qzoff.matrices(compiled.train, qzoff.contract(compiled.train))
    w = 256 * found[entry.matrix].astype(np.int64) + found[entry.low] + 128
    d = found[entry.divisors]
    assert (np.abs(w).max(axis=0) >= 2 ** 14).all()      # each column keeps its 15 bits
    # W/d ∝ P², whose eigenvalues are 1/(σ + λ) for the input's normalized second moment σ (mean 1, at most
    # K = 64): its condition number within the bound, up to W's rounding
    assert np.linalg.cond(w / d.astype(np.float64)) <= (64 + STEP_RIDGE) / STEP_RIDGE * 1.01


def test_node_defaults_and_rates():
    """ε is one output LSB; the rate is weight perturbation's / 256 (ĝ sums |a| <= 255 over examples), and
    tune's grid brackets it."""
    spec = TrainSpec(estimator="node").resolve(14)
    assert spec.eps == 1 and spec.lr == TrainSpec().resolve(14).lr / 256
    grid = lr_grid(14, "node")
    assert min(grid) < spec.lr < max(grid) and all(v >= 2 ** -8 for v in grid)


def test_node_centres_the_logits_step(target_train):
    """fc2 writes the logits the ce loss reads, and ce cannot see a shift of every logit: each example's V_b
    loses its mean over the 10 outputs, so the bias step sums to at most B·n/2 (the rounding) over the
    outputs. Uncentred, ±1 noise made it ~−m per example, and the logits drifted up until the deployed
    output QuantizeLinear saturated them all (10% accuracy at lr 2^-7)."""
    spec = TrainSpec(estimator="node", m=64, last=1, lr_shift=0, lr=1.0)
    compiled = compile_graph(shipped("digits_cnn/w8a8.onnx"), spec)
    bias = next(s for s in compiled.contract.state if s.role == "bias")
    x, y = target_train[0][:BATCH], target_train[1][:BATCH]
    out = Steps(compiled)(x, y, SEED, 0, 1)
    step = (compiled.state[bias.name].astype(np.int64) - out[bias.output]) // bias.stride      # ĝ_bias
    assert np.abs(step).sum() > 10 * BATCH and abs(int(step.sum())) <= BATCH * 10 // 2


def grouped_conv2(groups: int = 16):
    """digits_cnn with conv2 grouped: [32, 16/G, 3, 3], G = 16 (two output channels per input channel)."""
    import onnx
    from onnx import helper, numpy_helper
    model = shipped("digits_cnn/w8a8.onnx")
    inits = {i.name: i for i in model.graph.initializer}
    w = numpy_helper.to_array(inits["conv2.weight_quantized"])[:, :16 // groups]
    inits["conv2.weight_quantized"].CopyFrom(numpy_helper.from_array(w, "conv2.weight_quantized"))
    next(n for n in model.graph.node if n.name == "conv2").attribute.append(helper.make_attribute("group", groups))
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("optimization", ["disable", "all"])
@pytest.mark.parametrize("whiten", [False, True])
def test_node_depthwise_chain_matches_reference(optimization, whiten):
    """The keyword spotter's last block: a depthwise Conv (group 48, ĝ_W one product per channel), a 1x1
    pointwise Conv and the classifier; whitened, the pointwise Conv's and the classifier's steps are (a grouped
    Conv's is not)."""
    from conftest import MODELS
    from fgcompile.runtime.data import load_data
    data = load_data(MODELS / "data" / "kws_target_train.npz")
    spec = TrainSpec(estimator="node", m=3, last=3, precondition="whiten" if whiten else "auto")
    compiled = compile_graph(shipped("kws_dscnn/w8a8.onnx"), spec, data[0][:200] if whiten else None)
    assert sorted(w.site for w in compiled.contract.step_whitening) == (["block3.pw", "logits"] if whiten else [])
    assert run_chain("kws_dscnn/w8a8.onnx", spec, data, steps=3, optimization=optimization,
                     calibration=data[0][:200] if whiten else None, whitened=len(compiled.contract.step_whitening)) > 0


def test_node_grouped_conv_chain_matches_reference(target_train, tmp_path):
    """conv2 of digits_cnn grouped (16 groups of one input and two output channels), with fc1 and fc2."""
    import onnx
    onnx.save(grouped_conv2(), tmp_path / "grouped.onnx")
    assert run_chain(tmp_path / "grouped.onnx", TrainSpec(estimator="node", m=4, last=3), target_train, steps=4) > 0


@pytest.mark.parametrize("branches", ["stacked", "loop"])
@pytest.mark.parametrize("sites", [dict(last=2), dict(train=("block2.pw",))])
def test_node_chain_on_the_detector(branches, sites):
    """The keyword detector (bce, one label) at --last 2: its hidden layer's per-example signs come from
    sign(z⁺ − z⁻)·(1 − 2y) and its output layer steps along sigmoid(z) − y from a table (integer_loss):
    the same steps as the reference's bce_example_signs and bce_error. Alone (block2.pw), the hidden layer's
    signs are weighed by the clean logit's |sigmoid(z) − y| as at depth."""
    from fgcompile import models
    spec = TrainSpec(estimator="node", m=4, branches=branches, **sites)
    assert run_chain("kws_detect/w8a8.onnx", spec, models.split("kws_detect", "target_train"), steps=4) > 0
