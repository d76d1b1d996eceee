"""Outputs are staged in private temp files/folders (mkstemp 0600, mkdtemp 0700) and renamed into place;
they must still end up with the permissions a plain open()/mkdir() gives under the user's umask."""
import os
import stat

import numpy as np

from conftest import shipped
from fgcompile import modelio
from fgcompile.compiler import compile_model, write_compiled
from fgcompile.spec import TrainSpec


def test_outputs_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        source = shipped("digits_cnn/w8a8.onnx")
        out = write_compiled(compile_model(source, TrainSpec(m=1)), tmp_path / "out")
        modelio.save_npz(tmp_path / "single.npz", {"a": np.zeros(2)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for f in list(out.iterdir()) + [tmp_path / "single.npz"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
