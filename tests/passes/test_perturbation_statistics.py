"""The packed perturbations (one hash word feeds 32/k elements) are balanced and independent enough:
the graph's z equals the reference formula bit for bit (test_step_matches_reference), so the
statistics are checked on that formula over many seeds."""
import numpy as np
import pytest

from reference.qzoff import perturbation

N, SEEDS = 4096, 64


def draws(kind, density=1.0):
    return np.stack([perturbation(seed, 0, 0, i, N, kind, density) for seed in range(SEEDS) for i in range(2)])


def test_rademacher_is_balanced_and_uncorrelated():
    z = draws("rademacher").astype(np.float64)
    assert set(np.unique(z)) == {-1.0, 1.0}
    assert abs(z.mean()) < 4 / np.sqrt(z.size)
    # neighbours share a hash word (bits j and j+1), elements 32 apart do not; neither may correlate,
    # and the two streams of a seed must not either
    for lag in (1, 31, 32):
        assert abs((z[:, :-lag] * z[:, lag:]).mean()) < 4 / np.sqrt(z[:, lag:].size)
    assert abs((z[0::2] * z[1::2]).mean()) < 4 / np.sqrt(z[0::2].size)
    # each bit position of the word is fair
    per_bit = z.reshape(len(z), -1, 32).mean(axis=(0, 1))
    assert np.abs(per_bit).max() < 5 / np.sqrt(len(z) * N / 32)


@pytest.mark.parametrize("density", [0.1, 0.5])
def test_ternary_density_is_rounded_to_a_128th(density):
    z = draws("ternary", density)
    expected = round(128 * density) / 128
    assert abs((z != 0).mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / z.size)
    assert abs(z.mean()) < 4 / np.sqrt(z.size)


def test_gaussian_is_centred_binomial():
    z = draws("gaussian")
    assert z.min() >= -4 and z.max() <= 4
    assert abs(z.mean()) < 4 * np.sqrt(2 / z.size)
    assert abs(z.var() - 2.0) < 0.05       # the difference of two Binomial(4, 1/2): variance 2
