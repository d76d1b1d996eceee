"""The float simulation of node perturbation on the detector (benchmarks/detector_float_node.py): its chain
rule through block2.pw's Relu, the clipped mean over positions and fc is the loss's gradient (a central
difference of the summed logistic loss agrees), a short run of its node step trains, and its one-LSB loss
differences through the int8 activations keep the first-order signs as measured."""
import numpy as np
import pytest

pytest.importorskip("torch")
import detector_float_node  # noqa: E402


@pytest.fixture(scope="module")
def detector():
    return detector_float_node.Detector()


def _loss(d, w, b, f, fb, a, y):
    _, _, pooled = d.forward(w, b, a)
    z = pooled @ f + fb
    return float((np.logaddexp(0, z) - y * z).sum())


def test_the_chain_rule_is_the_logistic_loss_gradient(detector):
    d = detector
    a, y = d.train[0][:32], d.train[1][:32]
    e, delta, pooled = d.chain(d.w0, d.b0, d.f0, d.fb0, a, y)
    rng = np.random.default_rng(0)
    dw, db = rng.standard_normal(d.w0.shape), rng.standard_normal(d.b0.shape)
    h = 1e-6
    numeric = (_loss(d, d.w0 + h * dw, d.b0 + h * db, d.f0, d.fb0, a, y)
               - _loss(d, d.w0 - h * dw, d.b0 - h * db, d.f0, d.fb0, a, y)) / (2 * h)
    analytic = (np.einsum("bcp,bkp->ck", delta, a) * dw).sum() + (delta.sum((0, 2)) * db).sum()
    assert analytic == pytest.approx(numeric, rel=1e-4)
    assert (e @ pooled) == pytest.approx(np.array([(_loss(d, d.w0, d.b0, d.f0 + h * u, d.fb0, a, y) -
                                                    _loss(d, d.w0, d.b0, d.f0 - h * u, d.fb0, a, y)) / (2 * h)
                                                   for u in np.eye(len(d.f0))]), rel=1e-4, abs=1e-6)


def test_a_short_run_trains_past_the_untrained_model(detector):
    before = detector.score(detector.w0, detector.b0, detector.f0, detector.fb0)
    after = detector.fit(0, detector_float_node.LR_FC, detector_float_node.LR_PW, epochs=2)
    assert after[0] > before[0] + 0.005


def test_one_lsb_loss_differences_follow_the_first_order_signs_until_the_pool_rounds(detector):
    """The ± forwards through the int8 activations give the first-order sign for most examples and directions
    when the pool is read in float; its requantization flips more of them (it rounds a ~0.5 LSB move)."""
    rounded, floated = detector_float_node.sign_agreement(detector, batches=3)
    assert floated > 0.9
    assert rounded < floated - 0.05
