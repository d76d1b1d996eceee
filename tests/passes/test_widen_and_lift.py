"""Widening to the training grid (finer, with headroom) and lifting to state inputs keep the model's
function: bit for bit where the grid only gets finer, within half a coarse step for int16 with headroom."""
import numpy as np
import pytest

from conftest import shipped
from fgcompile.passes.pipeline import compile_graph
from fgcompile.session import make_session
from fgcompile.spec import TrainSpec


@pytest.mark.parametrize("model_file", ["digits_cnn/w8a8.onnx", "digits_attn/w8a8.onnx", "digits_cnn/w16a8.onnx"])
@pytest.mark.parametrize("bits,headroom", [(8, 1), (16, 1), (8, 4), (16, 4)])
def test_eval_graph_equals_source(model_file, bits, headroom, target_test):
    source = shipped(model_file)
    compiled = compile_graph(source, TrainSpec(bits=bits, last=2, estimator="sign", headroom=headroom))
    x = target_test[0]
    # both as ONNX defines them (fgcompile.session.ARITHMETIC_LEVEL): past it onnxruntime fuses the source's int8
    # products into kernels that saturate on x86 CPUs without AVX-VNNI, and not the widened eval graph's
    want = make_session(source, arithmetic=True).run(None, {"x": x})[0]
    got = make_session(compiled.eval, arithmetic=True).run(None, {"x": x, **compiled.state})[0]
    for s in compiled.contract.state:
        if s.widened and s.role == "weight" and s.factor >= 1:
            assert s.qmax >= 127 * s.factor * headroom    # the range grew H-fold
            assert not (compiled.state[s.name].astype(np.int64) % int(s.factor)).any()
    if "w16a8" in model_file and headroom > 1:   # int16 trains on a grid H times coarser (fgcompile/grid.py)
        assert (got.argmax(1) == want.argmax(1)).mean() > 0.99
        np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())
    else:
        np.testing.assert_array_equal(got, want)
