"""Per-pass checks of the paper's sparse update and kernel-wise normalization (the chains match the
reference bit for bit in test_step_matches_reference.py): what each does to one step."""
import numpy as np
import pytest

from conftest import shipped
from fgcompile.passes.pipeline import compile_graph
from fgcompile.spec import TrainSpec
from reference import qzoff
from steps import run_step


def one_step(spec, data, seed=7):
    compiled = compile_graph(shipped("digits_cnn/w8a8.onnx"), spec)
    x, y = data
    out = run_step(compiled, x[:32], y[:32], seed, 0, optimization="all")
    return {s.name: out[s.output].astype(np.int64) - compiled.state[s.name] for s in compiled.contract.state}


@pytest.mark.parametrize("mode", ["topk", "random", "threshold"])
def test_a_sparse_step_changes_at_most_the_kept_share(mode, target_train):
    dense = one_step(TrainSpec(m=8), target_train)
    sparse = one_step(TrainSpec(m=8, sparsity=0.9, sparse_mode=mode), target_train)
    w = "fc2.weight_quantized"
    assert (dense[w] != 0).mean() > 0.5
    changed = (sparse[w] != 0).mean()
    assert 0 < changed <= {"topk": 0.1, "random": 0.14, "threshold": 0.5}[mode], changed
    # where a sparse step moves a weight it moves it as the dense step does (the mask only zeroes ĝ)
    moved = sparse[w] != 0
    np.testing.assert_array_equal(sparse[w][moved], dense[w][moved])


def test_topk_keeps_the_largest_estimates_with_random_ties():
    rng = np.random.default_rng(0)
    g = rng.integers(-3, 4, size=(10, 64))
    u = rng.integers(0, 2 ** 16, size=g.shape)
    keep = qzoff.sparse_keep(g, u, "topk", 0.9)
    assert keep.sum() == 64 and np.abs(g[keep]).min() >= np.abs(g[~keep]).max()
    # the ties at the cut are chosen by the hash, not by position
    cut = np.abs(g) == np.abs(g[keep]).min()
    assert 0 < keep[cut].sum() < cut.sum() and keep[cut][: cut.sum() // 2].sum() < cut.sum() // 2


def test_kernel_norm_scales_each_kernel_to_its_weight_norm():
    w = np.array([[100, -100, 100, -100], [50, 50, -50, 50]])      # kernel 0 has twice the weight norm
    g = np.array([[8, -8, 8, 8], [16, -16, 16, 16]])                # and half the estimate's
    out = qzoff.kernel_normalized(g, w, 0)
    np.testing.assert_array_equal(out, [[16, -16, 16, 16], [8, -8, 8, 8]])   # steps ∝ weights, same total
    np.testing.assert_array_equal(qzoff.kernel_normalized(g, w, None), g)     # one kernel: unchanged


def test_kernel_norm_divides_lr_max_by_its_gain():
    plain = compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(m=8)).contract.lr_numerator.max
    normed = compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(m=8, kernel_norm=True)).contract.lr_numerator.max
    assert normed == (2 ** 31 - 1 - 256) // (8 * 16) and plain == (2 ** 31 - 1 - 256) // 8
