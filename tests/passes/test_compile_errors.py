"""Graphs the compiler cannot train give a clear error naming the node or tensor and the fix."""
import onnx
import pytest
from onnx import helper

from conftest import MODELS, shipped
from qdq_graphs import qdq_model
from fgcompile.errors import CompileError, ModelError, SpecError
from fgcompile.passes.pipeline import compile_graph
from fgcompile.spec import TrainSpec


def test_float_model():
    with pytest.raises(ModelError, match="not quantized.*quantize_static"):
        compile_graph(onnx.load(MODELS / "digits_cnn" / "fp32.onnx"), TrainSpec())


def test_invalid_input_model_is_reported_as_such():
    m = qdq_model()
    m.graph.node[3].attribute.append(helper.make_attribute("bogus", 1))
    with pytest.raises(ModelError, match="fails onnx.checker.*bogus"):
        compile_graph(m, TrainSpec())


def test_tiny_model_compiles():
    compiled = compile_graph(qdq_model(), TrainSpec())
    assert [s.name for s in compiled.contract.state] == ["W"]


def test_no_weight_sites():
    m = qdq_model(consumer="Add")
    with pytest.raises(CompileError, match="no weight sites"):
        compile_graph(m, TrainSpec())


def test_unsupported_op_on_trained_path_names_the_node():
    with pytest.raises(CompileError, match="'bad_node' \\(Dropout\\)"):
        compile_graph(qdq_model(extra_after="Dropout"), TrainSpec())


def test_tied_weights_name_both_consumers():
    with pytest.raises(CompileError, match="'W' is shared by 2 nodes \\(dqw, dqw2\\)"):
        compile_graph(qdq_model(tie=True), TrainSpec())


def test_train_pattern_matching_nothing_lists_sites():
    with pytest.raises(SpecError, match="matches no weight site.*fc2.weight_quantized"):
        compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(train=("nope",)))


def test_train_patterns_select_sites():
    c = compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(train=("conv2", "fc2.bias")))
    assert [s.name for s in c.contract.state] == ["conv2.weight_quantized", "conv2.bias_quantized",
                                                        "fc2.bias_quantized"]


def test_last_larger_than_sites():
    with pytest.raises(SpecError, match="--last 9.*only 4 weight sites"):
        compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(last=9, estimator="sign"))


@pytest.mark.parametrize("kw,flag", [(dict(m=0), "--m"), (dict(eps=0), "--eps"), (dict(lr=-1.0), "--lr"),
                                     (dict(density=0.5), "--density"), (dict(bits=4), "--bits"),
                                     (dict(lr=5000.0), "--lr")])
def test_bad_spec_names_the_flag(kw, flag):
    with pytest.raises(SpecError, match=flag):
        TrainSpec(**kw).resolve(16).validate()


def test_lr_that_would_overflow_is_refused():
    with pytest.raises(SpecError, match="overflow int32"):
        compile_graph(shipped("digits_cnn/w8a8.onnx"),
                      TrainSpec(m=64, perturbation="gaussian", estimator="spsa", lr=4000.0))


def test_all_compiled_graphs_load_and_check():
    for name in ("digits_cnn/w8a8.onnx", "digits_cnn/w16a8.onnx", "digits_attn/w8a8.onnx", "digits_attn/w16a8.onnx"):
        c = compile_graph(shipped(name), TrainSpec(last=3, estimator="sign", m=2))
        onnx.checker.check_model(c.train, full_check=True)
        onnx.checker.check_model(c.eval, full_check=True)
