"""evaluate: accuracy and mean cross-entropy of a plain model file or a compiled folder's latest state; for a
Sigmoid output (fgcompile/heads.py: the contract's head, or read from a plain model file the same way) the
mean binary cross-entropy, ROC AUC and the miss rate at a false-alarm rate (runtime/metrics.py)."""
from __future__ import annotations

import os
import pathlib

import math
import numbers

from fgcompile import folder, heads, modelio
from fgcompile.artifact import LAYOUT
from fgcompile.errors import ModelError, SpecError, wrong_type
from .data import read
from fgcompile.session import SessionSettings, class_count, input_dtype, input_shape, running
from .metrics import FALSE_ALARM, score
from .program import open_train_graph, scores_arithmetic, session_of
from .sink import latest_state


def evaluate(model_or_out, data, batch: int = 512, session: SessionSettings | None = None,
             false_alarm: float = FALSE_ALARM) -> dict:
    """Accuracy, mean loss and samples of a model file or a compiled folder on DATA (.npz path or (x, y));
    for a Sigmoid output also auc and miss_rate at `false_alarm`."""
    _check_arguments(model_or_out, data, batch, session, false_alarm)
    target = pathlib.Path(model_or_out)
    folder.recover(target)   # a compiled folder lost in a crashed swap comes back first
    if target.is_dir():
        if not (target / LAYOUT.eval).is_file():
            raise ModelError(f"{target}: no {LAYOUT.eval} here; pass a model file or a folder from `fgcompile compile`.")
        model = modelio.load_model(target / LAYOUT.eval)
        contract = open_train_graph(target)[1]
        sess = session_of(model, target / LAYOUT.eval, session=session, arithmetic=scores_arithmetic(contract))
        state, head = latest_state(target, contract), contract.head
    else:
        model = modelio.load_model(target)
        initialized = {i.name for i in model.graph.initializer}
        inputs = [i.name for i in model.graph.input if i.name not in initialized]
        if len(inputs) > 1 and target.name == LAYOUT.eval:
            hint = (f" {target.name} of a compiled folder takes its state as inputs: pass the folder instead "
                    f"(fgcompile eval {target.parent} --data ...).")
            raise ModelError(f"{target}: the model takes {len(inputs)} inputs ({', '.join(inputs[:4])}"
                             f"{', ...' if len(inputs) > 4 else ''}) but eval feeds only the data.{hint}")
        # a model file is scored as ONNX defines it (fgcompile.session.ARITHMETIC_LEVEL), as a deployment computes it
        sess, state, head = session_of(model, target, session=session, arithmetic=True), {}, heads.head_of(model).kind
        heads.check_classes(head, class_count(sess), sess.get_outputs()[0].name)
    data_input = sess.get_inputs()[0]
    x, y = read_as(sess, data, "evaluate(data)", head, state)
    with running(target / LAYOUT.eval if target.is_dir() else target):
        return score(sess, data_input.name, x, y, state, batch, head, false_alarm,
                     probabilities=heads.head_of(model).probabilities)


def read_as(sess, data, where: str, head: str, state=()) -> tuple:
    """(x, y) of DATA checked against a session's data inputs (those not in `state`), output and head."""
    names = [i.name for i in sess.get_inputs() if i.name not in state]
    return read(data, {n: (input_shape(sess, n), input_dtype(sess, n)) for n in names}, class_count(sess), where, head)


def _check_arguments(model_or_out, data, batch, session, false_alarm) -> None:
    if not isinstance(model_or_out, (str, os.PathLike)):
        raise wrong_type("evaluate(model_or_out=…)", "the path of an .onnx model or of a compiled folder",
                         model_or_out, ModelError)
    if not (isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1):
        raise SpecError(f"evaluate(batch={batch!r}): takes a positive int, the examples per run.")
    if not (isinstance(false_alarm, numbers.Real) and not isinstance(false_alarm, bool)
            and math.isfinite(false_alarm) and 0 < false_alarm < 1):
        raise SpecError(f"--false-alarm {false_alarm!r}: the false-alarm rate the miss rate is read at must be in "
                        "(0, 1), e.g. 0.05 (5% of the negatives may fire).")
    if session is not None and not isinstance(session, SessionSettings):
        raise wrong_type("evaluate(session=…)", "a SessionSettings or None", session)
