"""MeZO, the zeroth-order peer in benchmarks/real_size.py: the loss sees θ ± εzᵢ, θ comes back between
directions (up to float rounding of the in-place restore) and the update is −η/m · Σ gᵢ zᵢ with the
same zᵢ. Skipped where torch is not installed."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from mezo import mezo_step  # noqa: E402


def _net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    params = [p.requires_grad_(False) for p in net[2].parameters()]   # only the last layer trains
    return net, params, (lambda: torch.nn.functional.cross_entropy(net(x), y))


def _z(seed, params):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for p in params]


def test_loss_sees_each_perturbation_and_the_weights_come_back_between_them():
    net, params, loss = _net()
    theta = [p.clone() for p in params]
    seen = []
    m, eps, seed = 3, 1e-2, 5
    mezo_step(params, lambda: (seen.append([p.clone() for p in params]), loss())[1], m, eps, lr=0.0, seed=seed)
    assert len(seen) == 2 * m
    for i in range(m):
        z = _z(seed * m + i, params)
        for p0, zp, plus, minus in zip(theta, z, seen[2 * i], seen[2 * i + 1]):
            np.testing.assert_allclose(plus, p0 + eps * zp, rtol=0, atol=1e-6)
            np.testing.assert_allclose(minus, p0 - eps * zp, rtol=0, atol=1e-6)
    for p, p0 in zip(params, theta):   # lr 0: only the restore's rounding is left (ulps of eps·z)
        assert torch.allclose(p, p0, rtol=0, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(net[0].parameters(), _net()[0][0].parameters()))


def test_the_update_is_the_projected_gradients_along_the_same_directions():
    _, params, loss = _net()
    theta = [p.clone() for p in params]
    m, eps, lr, seed = 4, 1e-3, 0.5, 2
    grads = mezo_step(params, loss, m, eps, lr, seed)
    assert len(grads) == m and any(g != 0 for g in grads)
    zs = [_z(seed * m + i, params) for i in range(m)]
    for k, (p, p0) in enumerate(zip(params, theta)):
        expected = p0 - lr / m * sum(g * z[k] for g, z in zip(grads, zs))
        assert not torch.allclose(p, p0)
        np.testing.assert_allclose(p, expected, rtol=0, atol=1e-5)
    # the estimate points downhill: the step lowers the loss on this smooth problem
    _, _, loss0 = _net()
    with torch.no_grad():
        assert float(loss()) < float(loss0())
