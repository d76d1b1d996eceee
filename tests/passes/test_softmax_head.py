"""A classifier whose output is a Softmax (TFLite classifiers end in one): the CE loss reads the logits
before it, a chained step matches the reference there, and eval's loss is the probabilities' own
negative log, not a second log-softmax."""
import numpy as np
import onnx

from conftest import MODELS
from fgcompile import heads, models
from fgcompile.runtime.data import load_data
from fgcompile.runtime.evaluate import evaluate
from fgcompile.session import make_session
from fgcompile.spec import TrainSpec
from test_step_matches_reference import run_chain

DIGITS = models.manifest()["tflite"]["models"]["digits_int8"]
MODEL = models.path(DIGITS["file"])


def test_the_loss_reads_the_logits_before_the_softmax():
    model = onnx.load(MODEL)
    head = heads.head_of(model)
    made = {o: n for n in model.graph.node for o in n.output}
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    assert head.kind == "softmax" and head.probabilities
    # the tap is the Softmax's input, or the float tensor before the Q->DQ pair that feeds it
    tap_reader = softmax.input[0]
    while made[tap_reader].op_type == "DequantizeLinear" and tap_reader != head.tap:
        tap_reader = made[made[tap_reader].input[0]].input[0]
    assert head.tap == tap_reader and head.tap != model.graph.output[0].name


def test_a_chained_step_matches_the_reference(target_train):
    run_chain(onnx.load(MODEL), TrainSpec(m=2, last=2, estimator="sign"), target_train, steps=3)


def test_eval_loss_of_softmax_probabilities_is_their_negative_log():
    x, y = load_data(MODELS / DIGITS["data"]["source_test"])
    p = make_session(onnx.load(MODEL)).run(None, {"x": x})[0].astype(np.float64)
    expected = -np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1)).mean()
    result = evaluate(MODEL, (x, y))
    assert abs(result["loss"] - expected) < 1e-9
    assert result["loss"] < 0.5   # a second log-softmax of probabilities gave 1.51 at 95.5% accuracy
