"""--freeze on the command line (compile, batch, --config) and the weight sources issue #31 met, end to end:
each refusal is exit 2 with one line naming the problem and the fix, writes nothing and leaves the
user's files as they were."""
import json
import pathlib

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import MODELS
from weight_sources import as_constants, fake_quant, float16_weight, stft_frontend
from fgcompile.cli import main
from fgcompile.session import make_session

RESNET = pathlib.Path(__file__).resolve().parents[1] / "data" / "resnet18_fakequant.onnx"
DIGITS = MODELS / "data" / "digits_target_train.npz"


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in r.output and not isinstance(r.exception, (AssertionError, TypeError, KeyError)), \
        r.output
    return r


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def user_files(tmp_path):
    """A folder as a user has it: the STFT model, the float16 model and a note of theirs."""
    onnx.save(stft_frontend(), tmp_path / "stft.onnx")
    onnx.save(float16_weight(), tmp_path / "half.onnx")
    (tmp_path / "notes.txt").write_text("the user's work")
    return tmp_path


def config_file(text):
    def make(tmp):
        (tmp / "run.toml").write_text(text)
        return ["--config", tmp / "run.toml"]
    return make


CASES = {
    "--freeze matches nothing": (["--freeze", "^nothing$"], "--freeze '^nothing$' matches no weight site. Sites: "
                                 "conv10, conv26, gemm47. Patterns are Python regexes"),
    "--freeze invalid regex": (["--freeze", "conv[("], "--freeze 'conv[(': not a valid regular expression"),
    "--freeze everything": (["--freeze", "conv", "--freeze", "gemm"],
                            "--freeze 'conv gemm' freezes every weight site (conv10, conv26, gemm47); nothing is "
                            "left to train. Freeze fewer layers."),
    "--last beyond the unfrozen sites": (["--freeze", "conv10", "--last", "3"],
                                         "--last 3: the model has only 2 weight sites that --freeze leaves (1 frozen); "
                                         "lower --last or freeze fewer"),
    "--train names only frozen sites": (["--freeze", "conv10", "--train", "conv10"],
                                        "--train 'conv10' matches no weight site that --freeze 'conv10' leaves"),
    "freeze in --config not a list": (config_file('[compile]\nfreeze = "conv10"\n'),
                                     "freeze = 'conv10': a string, but --freeze is repeatable and takes a list"),
    "freeze in --config matching nothing": (config_file('[compile]\nfreeze = ["nothing"]\n'),
                                            "--freeze 'nothing' matches no weight site"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_freeze_refusals(user_files, case):
    args, message = CASES[case]
    args = args(user_files) if callable(args) else args
    before = snapshot(user_files)
    r = invoke("compile", user_files / "stft.onnx", "-o", user_files / "out", "--m", 2, *args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert snapshot(user_files) == before   # no output folder, nothing of the user's changed


def test_batch_refuses_a_bad_freeze_per_model(user_files):
    before = snapshot(user_files)
    r = invoke("batch", user_files, "-o", user_files / "out", "--m", 2, "--freeze", "(")
    assert r.exit_code == 2 and "--freeze '(': not a valid regular expression" in r.output, r.output
    assert snapshot(user_files) == before


def test_a_weight_that_cannot_fold_is_named(user_files):
    """Before: 'weights go through a QuantizeLinear that cannot be folded (block or float8 quantization)'."""
    before = snapshot(user_files)
    r = invoke("compile", user_files / "half.onnx", "-o", user_files / "out")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "cannot be folded (a float16 weight: fgcompile folds float32 weights only) (1 nodes, e.g. 'gemm')" \
        in r.output
    assert "block or float8" not in r.output
    assert snapshot(user_files) == before
    r = invoke("inspect", user_files / "half.onnx")
    assert r.exit_code == 0 and "stays float: gemm (Gemm: Wd): weights go through a QuantizeLinear" in r.output


def test_freeze_a_fixed_basis(user_files):
    """inspect suggests the flag; compile with it trains the two sites after the basis; the flag is recorded."""
    r = invoke("inspect", user_files / "stft.onnx")
    assert "note: conv10 (Conv 258x1x256, no bias, on the model input 'wave') looks like a fixed transform" in r.output
    config_args = config_file('[compile]\nfreeze = ["^conv10$"]\nlast = 2\nm = 2\n')(user_files)
    for args in (["--freeze", "^conv10$", "--last", 2, "--m", 2], config_args):
        r = invoke("compile", user_files / "stft.onnx", "-o", user_files / "out", "--force", "--json", *args)
        assert r.exit_code == 0, r.output
        contract = json.loads(r.output)["contract"]
        assert [s["site"] for s in contract["state"]] == ["conv26", "conv26", "gemm47", "gemm47"]
        assert contract["spec"]["freeze"] == ["^conv10$"]


def test_torch_fakequant_resnet18_compiles_trains_and_exports(tmp_path):
    """The TorchScript export of issue #31, with the defaults: --last 1 is fc, --last 2 the last conv too."""
    r = invoke("compile", RESNET, "-o", tmp_path / "out", "--last", 2, "--m", 2)
    assert r.exit_code == 0, r.output
    assert "trains blocks.7.conv2.conv.weight_quantized" in r.output and "trains fc.conv.weight_quantized" in r.output
    assert invoke("train", tmp_path / "out", "--data", DIGITS, "--epochs", 1, "--quiet").exit_code == 0
    r = invoke("export", tmp_path / "out", "-o", tmp_path / "adapted.onnx")
    assert r.exit_code == 0, r.output
    adapted = onnx.load(tmp_path / "adapted.onnx")
    x = np.load(DIGITS)["x"][:8]
    assert make_session(adapted).run(None, {"x": x})[0].shape == (8, 10)
    # torch keeps biases float: each trains on its own int32 grid and is written back as trained, with its
    # own scalar scale, whatever rescaling the weight's channels needed (before: a per-channel scale with
    # no axis, which onnxruntime refused to run)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in adapted.graph.initializer}
    with np.load(tmp_path / "out" / "checkpoint.npz") as state:
        for bias in ("blocks.7.conv2.conv.bias", "fc.conv.bias"):
            np.testing.assert_array_equal(inits[bias], state[bias])
            assert inits[f"{bias}/grid"].shape == ()


def test_constant_node_model_trains_like_the_original(tmp_path):
    """The shipped CNN with Constant-node weights and Identity-shared zero points: compile, train and export
    give the files the original gives (the same trained state, bit for bit)."""
    source = onnx.load(MODELS / "digits_cnn" / "w8a8.onnx")
    onnx.save(as_constants(fake_quant(source), constants=True), tmp_path / "constants.onnx")
    states = []
    for name, model in (("orig", MODELS / "digits_cnn" / "w8a8.onnx"), ("const", tmp_path / "constants.onnx")):
        assert invoke("compile", model, "-o", tmp_path / name, "--last", 2, "--m", 2).exit_code == 0
        assert invoke("train", tmp_path / name, "--data", DIGITS, "--epochs", 1, "--quiet").exit_code == 0
        with np.load(tmp_path / name / "checkpoint.npz") as f:
            states.append([f[k] for k in sorted(f.files) if not k.startswith("__")])
    assert len(states[0]) == len(states[1]) > 0
    for a, b in zip(*states):
        np.testing.assert_array_equal(a, b)
