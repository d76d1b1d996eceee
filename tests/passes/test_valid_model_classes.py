"""Valid models that used to stop with an internal error: one generated graph per class.

- unnamed or duplicate-named nodes (valid ONNX; quant_pre_process leaves many): cloned branch suffixes
  used to reuse one generated name;
- an opset-18 model: it used to be converted to opset 21 whatever the emitted ops needed.
"""
import onnx
import pytest

import qdq_graphs
from fgcompile.passes.pipeline import compile_graph
from fgcompile.spec import TrainSpec
from test_step_matches_reference import run_chain


def digits_conv_chain():
    return qdq_graphs.conv_chain(5, channels=(1, 3, 2), hw=8, classes=10)


@pytest.mark.parametrize("bits", [8, 16])
def test_unnamed_nodes_compile_cloned_and_match_reference(bits, target_train):
    model = digits_conv_chain()
    for n in model.graph.node:
        n.name = ""
    for form in ("cloned", "stacked"):                # clones copy node names: both forms need unique ones
        spec = TrainSpec(last=2, estimator="sign", m=2, bits=bits, branches=form)
        compiled = compile_graph(model, spec)
        assert compiled.contract.branches == form
        names = [n.name for n in compiled.train.graph.node]
        assert len(set(names)) == len(names) and all(names)
        run_chain(model, spec, target_train, steps=3)


@pytest.mark.parametrize("bits,headroom,opset", [(8, 1, 18), (16, 1, 21), (8, 4, 21)])
def test_opset_rises_only_for_int16_dequantize(bits, headroom, opset, target_train):
    """--bits 16 and --headroom > 1 both train int8 weights on an int16 grid."""
    model = digits_conv_chain()
    model.opset_import[0].version = 18
    onnx.checker.check_model(model, full_check=True)
    spec = TrainSpec(last=2, estimator="sign", m=2, bits=bits, headroom=headroom)
    compiled = compile_graph(model, spec)
    for graph in (compiled.train, compiled.eval):
        assert next(o.version for o in graph.opset_import if o.domain == "") == opset
    run_chain(model, spec, target_train, steps=3)


def test_opset_below_18_is_converted_to_18():
    model = qdq_graphs.dense_chain(2)
    model.opset_import[0].version = 17
    compiled = compile_graph(model, TrainSpec(bits=8, m=2, headroom=1))
    assert next(o.version for o in compiled.train.opset_import if o.domain == "") == 18
