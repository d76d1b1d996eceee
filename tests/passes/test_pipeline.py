"""The pipeline is a list of passes run in a loop that checks each pass's declared reads and adds: a
broken pass is named in the error, with the passes that ran before it, instead of a bare KeyError."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest

from conftest import shipped
from fgcompile.errors import CompileError
from fgcompile.passes import pipeline
from fgcompile.passes.context import Context, Pass
from fgcompile.spec import TrainSpec


def _with(new: Pass, after: str) -> list[Pass]:
    passes = list(pipeline.PASSES)
    passes.insert([p.name for p in passes].index(after) + 1, new)
    return passes


def _compile(passes):
    return pipeline.compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(m=2), passes=passes)


def test_an_exception_in_a_pass_names_it_and_the_passes_before():
    def broken(graph, ctx):
        return {}["missing"]
    with pytest.raises(CompileError) as err:
        _compile(_with(Pass("broken", broken), after="select"))
    msg = str(err.value)
    assert "pass 'broken'" in msg and "KeyError" in msg and "'missing'" in msg
    assert "after check, canonicalize, prompts, load, activations, analyze, select)" in msg


def test_a_pass_that_does_not_set_what_it_adds_is_named():
    with pytest.raises(CompileError, match=r"pass 'lazy' .*did not set eval_model"):
        _compile(_with(Pass("lazy", lambda graph, ctx: graph, adds=("eval_model",)), after="lift"))


def test_a_pass_that_reads_what_nobody_set_is_named():
    with pytest.raises(CompileError, match=r"pass 'early' reads branches, which no pass before it"):
        _compile(_with(Pass("early", lambda graph, ctx: graph, reads=("branches",)), after="prng"))


def test_a_dangling_input_is_caught_after_the_pass_that_left_it():
    def dangle(graph, ctx):
        node = next(n for n in graph.nodes if n.op == "Gemm")
        node.inputs[0] = gs.Variable("nowhere", dtype=np.float32)
        return graph
    with pytest.raises(CompileError, match=r"pass 'dangle' .*'nowhere' \(read by"):
        _compile(_with(Pass("dangle", dangle), after="analyze"))


def test_every_read_is_added_by_an_earlier_pass():
    """The list reads top to bottom: nothing a pass reads comes from a later one."""
    available = {"spec", "source", "calibration"}   # what compile_graph gives the Context
    for p in pipeline.PASSES:
        assert set(p.reads) <= available, (p.name, set(p.reads) - available)
        available |= set(p.adds)
    assert set(vars(Context(TrainSpec(), None))) <= available
