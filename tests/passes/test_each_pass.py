"""One test per pass product, beside the chain tests: z (prng), the cᵢ and ĝ (estimate, kernelnorm,
sparsify), the new state (update) and the branch losses (pair + loss), each read from the compiled graph
as an extra output and compared with the reference's function for that quantity. Each pass's input is
the graph's own (e.g. update gets the graph's ĝ), so a failure names the pass, not the chain."""
import numpy as np
import pytest

from conftest import shipped
from fgcompile.passes import pipeline
from fgcompile.passes.context import Pass
from fgcompile.spec import TrainSpec
from reference import qzoff
from steps import Steps

SEED, STEP = 11, 5


def _compiled_with_probes(spec: TrainSpec):
    """(compiled, {state name: ĝ tensor name}): a probe pass after the last ĝ rewrite notes the names."""
    grads = {}

    def note(graph, ctx):
        grads.update({name: t.name for name, t in ctx.estimate.grad.items()})
        return graph
    passes = list(pipeline.PASSES)
    passes.insert([p.name for p in passes].index("update"), Pass("probe", note, reads=("estimate",)))
    return pipeline.compile_graph(shipped("digits_cnn/w8a8.onnx"), spec, passes=passes), grads


@pytest.fixture(scope="module", params=[
    TrainSpec(m=4),
    TrainSpec(m=3, last=2, estimator="sign", perturbation="ternary", density=0.25, rounding="stochastic", lr=0.3),
    TrainSpec(m=2, estimator="spsa", spsa_gain=4000.0, perturbation="gaussian", lr_shift=0, lr=3.0),
    TrainSpec(m=4, kernel_norm=True, sparsity=0.5, sparse_mode="topk"),
], ids=["sign", "ternary-stochastic", "spsa-gaussian", "kernelnorm-topk"])
def stepped(request, target_train):
    compiled, grads = _compiled_with_probes(request.param)
    probes = compiled.contract.probes
    run = Steps(compiled, probes=[*probes.z, probes.coefficients, *grads.values()])
    x, y = target_train[0][:32], target_train[1][:32]
    out = run(x, y, SEED, STEP)
    c = qzoff.contract(compiled.train)
    return c, compiled, out, {s["name"]: out[grads[s["name"]]] for s in c["state"]}


def test_prng_z_matches_reference(stepped):
    c, compiled, out, _ = stepped
    want = qzoff.perturbations(c, SEED, STEP)
    for s, name in zip(c["state"], compiled.contract.probes.z):
        np.testing.assert_array_equal(out[name], np.stack(want[s["name"]]), err_msg=f"prng: z of {s['name']}")


def test_loss_branches_match_reference(stepped, target_train):
    c, compiled, out, _ = stepped
    oracle = qzoff.InferenceOracle(compiled.source, c)
    x, y = target_train[0][:32], target_train[1][:32]
    zs = qzoff.perturbations(c, SEED, STEP)
    for i in range(c["spec"]["m"]):
        for sign, key in ((1, "loss_plus"), (-1, "loss_minus")):
            w = {s["name"]: np.clip(compiled.state[s["name"]].astype(np.int64) + sign * c["spec"]["eps"] * s["stride"]
                                    * zs[s["name"]][i], s["qmin"], s["qmax"]).astype(s["dtype"]) for s in c["state"]}
            want = qzoff.loss(oracle.logits(x, w), y, c["spec"]["loss"])
            np.testing.assert_allclose(out[key][i], want, rtol=1e-4, err_msg=f"pair/loss: {key}[{i}]")


def test_estimate_matches_reference(stepped):
    """cᵢ from the graph's own losses, then ĝ (with kernel normalization and sparsity when on)."""
    c, compiled, out, grads = stepped
    coef = qzoff.coefficients(out["loss_plus"], out["loss_minus"], c)
    np.testing.assert_array_equal(out[compiled.contract.probes.coefficients], coef, err_msg="estimate: cᵢ")
    want = qzoff.gradient(c, coef, qzoff.perturbations(c, SEED, STEP), compiled.state, SEED, STEP)
    assert any(np.any(g != 0) for g in want.values()), "ĝ = 0 everywhere: the comparison would be vacuous"
    for name, g in want.items():
        np.testing.assert_array_equal(grads[name], g, err_msg=f"estimate: ĝ of {name}")


def test_update_matches_reference(stepped):
    """The new state from the graph's own ĝ."""
    c, compiled, out, grads = stepped
    want = qzoff.update(c, compiled.state, grads, c["lr_numerator"]["default"], SEED, STEP)
    moved = 0
    for s in c["state"]:
        np.testing.assert_array_equal(out[s["output"]], want[s["name"]], err_msg=f"update: {s['name']}")
        moved += int((want[s["name"]] != compiled.state[s["name"]]).sum())
    assert moved > 0, "no weight moved: the comparison would be vacuous"
