"""A training process killed with SIGKILL and resumed ends with weights bit-identical to an
uninterrupted run with the same seed."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np

from conftest import MODELS, shipped
from fgcompile.compiler import compile_model, write_compiled
from fgcompile.runtime import checkpoint
from fgcompile.runtime.trainer import Trainer, latest_state
from fgcompile.spec import TrainSpec

DATA = MODELS / "data" / "digits_target_train.npz"
RUN = dict(epochs=3, batch=32, checkpoint_every=7, progress=False)


def compiled(out):
    source = shipped("digits_cnn/w8a8.onnx")
    write_compiled(compile_model(source, TrainSpec(m=2, rounding="stochastic", last=2, estimator="sign")), out)
    return out


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    full = compiled(tmp_path / "full")
    Trainer(full).fit(DATA, **RUN)
    want = latest_state(full)

    killed = compiled(tmp_path / "killed")
    # the child trains 20 steps (last checkpoint at step 14), then dies without any cleanup
    script = textwrap.dedent(f"""
        import os, signal
        from fgcompile.runtime.trainer import Trainer
        Trainer({str(killed)!r}).fit({str(DATA)!r}, stop_after=20, **{RUN!r})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    mid = Trainer(killed)
    mid_state, mid_meta = checkpoint.load(killed / "checkpoint.npz")
    assert mid_meta["step"] == 14
    assert any((mid_state[k] != want[k]).any() for k in want), "the kill must land before the end"
    assert not [p for p in os.listdir(killed) if p.endswith(".tmp")], "no temp files left behind"

    mid.fit(DATA, resume=True, **RUN)
    got = latest_state(killed)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
        assert got[k].dtype == want[k].dtype
