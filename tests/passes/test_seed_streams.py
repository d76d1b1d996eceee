"""Each (seed, step) pair draws its own perturbations (issue #18): runs seeded s and s+1 share no z over
their first 100 steps (with the old key, seed s+1 replayed seed s one step later), and a given pair
reproduces bit for bit, in any order and in a fresh session, equal to the reference formula."""
import numpy as np
import pytest

from conftest import shipped
from fgcompile.passes.pipeline import compile_graph
from fgcompile.spec import TrainSpec
from reference import qzoff
from steps import Steps

STEPS, M = 100, 2


@pytest.fixture(scope="module")
def z_of():
    """z_of(seed, step) -> the graph's z, int32 [m, numel] per trainable, concatenated: [m, Σ numel]."""
    compiled = compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(m=M))
    names = compiled.contract.probes.z
    x, y = np.zeros([1, 1, 8, 8], np.float32), np.zeros([1], np.int64)

    def z_of(seed, step, run=None):
        out = (run or Steps(compiled, optimization="all", probes=names))(x, y, seed, step, 0)
        return np.concatenate([out[n].reshape(M, -1) for n in names], axis=1)
    z_of.session = Steps(compiled, optimization="all", probes=names)
    z_of.contract = qzoff.contract(compiled.train)
    return z_of


@pytest.mark.parametrize("seed", [0, 7, 2 ** 32 - 1])
def test_neighbouring_seeds_share_no_perturbation(z_of, seed):
    a = np.stack([z_of(seed, k, z_of.session) for k in range(STEPS)]).reshape(STEPS * M, -1)
    b = np.stack([z_of((seed + 1) % 2 ** 32, k, z_of.session) for k in range(STEPS)]).reshape(STEPS * M, -1)
    n = a.shape[1]
    # agreement of every stream of every step of one run with every one of the other: ±1 draws that are
    # independent agree on half their entries (σ = 0.5/√n); a shared or shifted stream agrees on all
    agree = (a.astype(np.int64) @ b.T.astype(np.int64) + n) / (2 * n)
    assert agree.max() < 0.5 + 6 * 0.5 / np.sqrt(n), agree.max()
    assert abs(agree.mean() - 0.5) < 0.01
    # within a run, no two steps or streams repeat either
    own = (a.astype(np.int64) @ a.T.astype(np.int64) + n) / (2 * n)
    np.fill_diagonal(own, 0)
    assert own.max() < 0.5 + 6 * 0.5 / np.sqrt(n)


def test_a_seed_step_pair_reproduces_bit_for_bit(z_of):
    first = {(s, k): z_of(s, k, z_of.session) for s in (3, 4) for k in (0, 1, 99, 2 ** 31 - 1)}
    for (s, k), z in reversed(list(first.items())):
        np.testing.assert_array_equal(z_of(s, k), z)      # a fresh session, pairs in another order
    for t, st in enumerate(z_of.contract["state"]):
        numel = int(np.prod(st["shape"]))
        offset = sum(int(np.prod(o["shape"])) for o in z_of.contract["state"][:t])
        for (s, k), z in first.items():
            for i in range(M):
                want = qzoff.perturbation(s, k, t, i, numel, "rademacher", 1.0)
                np.testing.assert_array_equal(z[i, offset:offset + numel], want)


def test_contract_names_the_stream(z_of):
    assert z_of.contract["stream"] == qzoff.STREAM
    assert z_of.contract["inputs"]["seed"] == "seed" and z_of.contract["inputs"]["step"] == "step"
