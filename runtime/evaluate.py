"""evaluate: accuracy and mean cross-entropy of a plain model file or a compiled folder's latest state."""
from __future__ import annotations

import pathlib

from fgcompile import modelio
from fgcompile.compiler import EVAL
from fgcompile.errors import ModelError
from .data import load_data
from .session import class_count, make_session
from .metrics import score
from .trainer import latest_state


def evaluate(model_or_out, data, batch: int = 512) -> dict:
    target = pathlib.Path(model_or_out)
    if target.is_dir():
        if not (target / EVAL).is_file():
            raise ModelError(f"{target}: no {EVAL} here; pass a model file or a folder from `fgcompile compile`.")
        sess, state = make_session(modelio.load_model(target / EVAL)), latest_state(target)
    else:
        model = modelio.load_model(target)
        try:
            sess = make_session(model)
        except Exception as exc:
            raise ModelError(f"{target}: onnxruntime cannot load it ({str(exc).splitlines()[0]}).") from None
        state = {}
    data_input = sess.get_inputs()[0]
    x, y = data if isinstance(data, tuple) else load_data(data, data_input.shape, class_count(sess))
    return score(sess, data_input.name, x, y, state, batch)
