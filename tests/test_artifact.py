"""The compiled artifact is defined once (fgcompile/artifact.py) and the runtime stands on it alone."""
import json
import subprocess
import sys

from conftest import shipped
from fgcompile.artifact import LAYOUT, Contract
from fgcompile.compiler import compile_model, write_compiled
from fgcompile.spec import TrainSpec
from reference import qzoff


def test_the_runtime_imports_neither_the_passes_nor_graphsurgeon():
    code = ("import sys, fgcompile.runtime.trainer, fgcompile.runtime.evaluate, fgcompile.runtime.export, "
            "fgcompile.runtime.conformance\n"
            "loaded = [m for m in sys.modules if m == 'onnx_graphsurgeon' or m.startswith('fgcompile.passes')]\n"
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_contract_round_trips_through_json(target_train, tmp_path):
    """from_dict reads every key to_dict writes, whitening entries included; the folder holds the layout."""
    compiled = compile_model(shipped("digits_cnn/w8a8.onnx"), TrainSpec(m=2, last=2, estimator="sign"),
                             calibration=target_train[0][:64])
    written = qzoff.contract(compiled.train)
    assert written["precondition"] and json.loads(Contract.from_dict(written).to_json()) == written
    assert json.loads(compiled.contract.to_json()) == written
    out = write_compiled(compiled, tmp_path / "out")
    assert {p.name for p in out.iterdir()} == {LAYOUT.train, LAYOUT.eval, LAYOUT.state, LAYOUT.source,
                                                LAYOUT.marker, LAYOUT.lock}


def test_a_contract_of_another_format_asks_for_a_recompile(tmp_path):
    import onnx
    import pytest
    from fgcompile.errors import ModelError
    from fgcompile.validate import parse_contract
    compiled = compile_model(shipped("digits_cnn/w8a8.onnx"), TrainSpec(m=2))
    prop = next(p for p in compiled.train.metadata_props if p.key == "fgcompile")
    prop.value = json.dumps({**json.loads(prop.value), "format": "fgcompile-train/1"})
    onnx.save(compiled.train, tmp_path / "train.onnx")
    with pytest.raises(ModelError, match=r"contract fgcompile-train/1; this one reads fgcompile-train/2\). Recompile"):
        parse_contract(onnx.load(tmp_path / "train.onnx"), tmp_path / "train.onnx")
