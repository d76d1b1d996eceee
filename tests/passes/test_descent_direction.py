"""m=1, ε=1, lr=1 LSB, Rademacher, nearest rounding: the step ΔW points to the lower of the two paired
losses, checked with the original inference model: L(W + ε·ΔW) < L(W − ε·ΔW).

Both run with onnxruntime's default optimizations: the graph descends the loss of the runtime it runs on
(on x86 a fused u8s8 QLinearMatMul can saturate where the unfused float path does not)."""
import json

import numpy as np
import pytest

from conftest import shipped
from fgcompile.passes.pipeline import compile_graph
from fgcompile.spec import TrainSpec
from reference import qzoff
from steps import Steps


@pytest.mark.parametrize("model_file", ["digits_cnn/w8a8.onnx", "digits_attn/w8a8.onnx"])
def test_step_descends_the_paired_loss(model_file, target_train):
    source = shipped(model_file)
    compiled = compile_graph(source, TrainSpec(m=1, eps=1, lr=1.0, bits=8, include_bias=False))
    c = qzoff.contract(compiled.train)
    oracle = qzoff.InferenceOracle(source, c, optimized=True)
    run = Steps(compiled, optimization="all")
    x, y = target_train
    moved = 0
    for k in range(10):
        idx = np.arange(k * 32, (k + 1) * 32)
        out = run(x[idx], y[idx], 0, k, c["lr_numerator"]["default"])
        (s,) = c["state"]
        w = compiled.state[s["name"]].astype(np.int64)
        dw = out[s["output"]].astype(np.int64) - w
        if not dw.any():
            assert out["loss_plus"][0] == out["loss_minus"][0]  # only a tie leaves W unchanged
            continue
        moved += 1
        lo = lambda v: qzoff.loss(oracle.logits(x[idx], {s["name"]: np.clip(v, s["qmin"], s["qmax"]).astype(s["dtype"])}), y[idx], "ce")
        assert lo(w + dw) < lo(w - dw), f"step {k}: the update climbs"
    assert moved >= 8
