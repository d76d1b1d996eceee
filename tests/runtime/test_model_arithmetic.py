"""Scores are of the model's own ONNX arithmetic (fgcompile.session.ARITHMETIC_LEVEL): evaluate and the eval
graph of an exact compile run QDQ as written, where onnxruntime's fused int8 kernels may saturate u8 x s8
products (CPUs without AVX-VNNI); an eval under --forward qdq runs the runtime's own kernels, as its step does."""
import numpy as np
import onnxruntime as ort
import pytest

import fgcompile
from conftest import MODELS, shipped
from fgcompile.runtime.data import load_data
from fgcompile.runtime.program import Program
from fgcompile.session import ARITHMETIC_LEVEL, OPTIMIZATION, SessionSettings, make_session

ONE_THREAD = SessionSettings(threads=1)


def _level(sess) -> ort.GraphOptimizationLevel:
    return sess.get_session_options().graph_optimization_level


def _as_written(model, x, y) -> float:
    """Accuracy with onnxruntime running the ONNX ops as written (no fusion: the conformance baseline)."""
    sess = make_session(model, settings=SessionSettings(threads=1, optimization="disable"))
    return float((sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(-1) == y).mean())


@pytest.mark.parametrize("name", ["digits_cnn", "kws_dscnn"])
def test_evaluate_scores_the_model_as_written(name):
    model = MODELS / f"{name}/w8a8.onnx"
    data = MODELS / "data" / f"{name.split('_')[0]}_target_test.npz"
    x, y = load_data(str(data))
    assert fgcompile.evaluate(str(model), str(data))["accuracy"] == pytest.approx(_as_written(str(model), x, y), abs=1e-12)


@pytest.mark.parametrize("optimization", list(OPTIMIZATION))
def test_arithmetic_sessions_stop_at_the_level_that_keeps_qdq(optimization):
    settings = SessionSettings(threads=1, optimization=optimization)
    cap = list(OPTIMIZATION).index(ARITHMETIC_LEVEL)
    expected = list(OPTIMIZATION)[min(list(OPTIMIZATION).index(optimization), cap)]
    path = str(MODELS / "digits_cnn/w8a8.onnx")
    assert _level(make_session(path, settings=settings, arithmetic=True)) == \
        getattr(ort.GraphOptimizationLevel, OPTIMIZATION[expected])
    assert _level(make_session(path, settings=settings)) == getattr(ort.GraphOptimizationLevel, OPTIMIZATION[optimization])


@pytest.mark.parametrize("forward", ["exact", "qdq"])
def test_eval_runs_the_arithmetic_its_step_trains(forward):
    compiled = fgcompile.compile_model(shipped("digits_cnn/w8a8.onnx"), fgcompile.TrainSpec(forward=forward))
    program = Program.of_compiled(compiled, ONE_THREAD)
    expected = ARITHMETIC_LEVEL if forward == "exact" else "all"
    assert _level(program.eval) == getattr(ort.GraphOptimizationLevel, OPTIMIZATION[expected])
    x, y = load_data(str(MODELS / "data/digits_target_test.npz"))
    if forward == "exact":   # the compiled eval at the pretrained state scores as the source run as written
        assert program.evaluate(dict(compiled.state), x, y)["accuracy"] == \
            pytest.approx(_as_written(shipped("digits_cnn/w8a8.onnx"), x, y), abs=1e-12)
