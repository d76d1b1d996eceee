"""The keyword-spotting recipe rebuilds the committed data bit for bit (needs espeak-ng and scipy)."""
import hashlib
import importlib.util
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import MODELS

RECIPE = MODELS / "recipes" / "kws_data.py"
SPLITS = ("source_train", "source_test", "target_train", "target_test")


def digest(path) -> str:
    with np.load(path) as f:
        return hashlib.sha256(b"".join(f[k].tobytes() + str(f[k].dtype).encode() for k in sorted(f.files))).hexdigest()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None or importlib.util.find_spec("scipy") is None,
                    reason="the recipe needs espeak-ng (apt-get install espeak-ng) and scipy")
def test_recipe_rebuilds_the_committed_data(tmp_path):
    subprocess.run([sys.executable, str(RECIPE), str(tmp_path)], check=True, capture_output=True, timeout=600)
    for split in SPLITS:
        assert digest(tmp_path / f"kws_{split}.npz") == digest(MODELS / "data" / f"kws_{split}.npz"), split
