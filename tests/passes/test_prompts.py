"""--prompts N: trainable tokens appended at a transformer block's input; the step (prompt tokens on the
int32 float grid, with the head) matches the reference bit for bit; a model without a token axis is
refused by name."""
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import MODELS, shipped
from fgcompile.cli import main
from fgcompile.errors import CompileError
from fgcompile.passes.pipeline import compile_graph
from fgcompile.spec import TrainSpec
from test_step_matches_reference import run_chain


@pytest.mark.parametrize("at", ["", "ln2"])
def test_prompt_step_matches_reference(at, target_train):
    spec = TrainSpec(prompts=3, prompt_at=at, m=2)
    compiled = compile_graph(shipped("digits_attn/w8a8.onnx"), spec)
    prompt = next(s for s in compiled.contract.state if s.name == "prompt")
    assert prompt.role == "prompt" and prompt.shape == [3, 32] and prompt.float_grid > 0
    joined = next(n for n in compiled.source.graph.node if n.name == "fgcompile/prompt/append")
    reader = next(n for n in compiled.source.graph.node if joined.output[0] in n.input and n.op_type == "LayerNormalization")
    assert reader.name == (at or "ln1")
    final = run_chain("digits_attn/w8a8.onnx", spec, target_train, steps=4)
    assert (final["prompt"] != compiled.state["prompt"]).any(), "the prompt never moved"


def test_prompts_refused_without_a_token_axis():
    with pytest.raises(CompileError, match="--prompts: no sequence axis found"):
        compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(prompts=2))
    with pytest.raises(CompileError, match="LayerNormalization 'nope'"):
        compile_graph(shipped("digits_attn/w8a8.onnx"), TrainSpec(prompts=2, prompt_at="nope"))


def test_prompts_cli_train_and_export(tmp_path):
    run = lambda *a: CliRunner().invoke(main, [str(v) for v in a])
    data = MODELS / "data" / "digits_target_train.npz"
    for args in (["compile", MODELS / "digits_attn" / "w8a8.onnx", "-o", tmp_path / "out", "--prompts", "2", "--m", "2"],
                 ["train", tmp_path / "out", "--data", data, "--epochs", "1", "--quiet"],
                 ["export", tmp_path / "out", "-o", tmp_path / "adapted.onnx"],
                 ["eval", tmp_path / "adapted.onnx", "--data", data]):
        r = run(*args)
        assert r.exit_code == 0, (args, r.output)
