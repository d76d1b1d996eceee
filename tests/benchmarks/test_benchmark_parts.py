"""The parts of the benchmarks whose numbers the README quotes: the model split behind the step-cost
floor, the fp32 counterpart of the trained tensors, the memory probe, and the report's arithmetic.
(The benchmarks themselves are scripts that print measurements; no timing is asserted here.)"""
import numpy as np
import pytest

import accuracy
import memory
import report
from conftest import MODELS, shipped
from split import split
from fgcompile.session import make_session

TRAINED = {"digits_cnn": ["fc2.weight_quantized", "fc2.bias_quantized"], "digits_attn": ["head.weight_quantized"]}


def _run(model, feeds, outputs=None):
    return make_session(model).run(outputs, feeds)


@pytest.mark.parametrize("variant", ["w8a8", "w16a8"])
@pytest.mark.parametrize("name", sorted(TRAINED))
def test_prefix_then_suffix_is_the_model(name, variant, target_test):
    model = shipped(f"{name}/{variant}.onnx")
    prefix, suffix, boundary = split(model, TRAINED[name])
    x = target_test[0][:64]
    mid = _run(prefix, {"x": x}, boundary)
    np.testing.assert_array_equal(_run(suffix, dict(zip(boundary, mid)))[0], _run(model, {"x": x})[0])
    # the suffix holds the trained tensors and starts at quantized activations (so it fuses like the model)
    assert set(TRAINED[name]) <= {i.name for i in suffix.graph.initializer}
    assert not set(TRAINED[name]) & {i.name for i in prefix.graph.initializer}
    assert all(m.dtype == np.uint8 for m in mid)


def test_fp32_counterparts_of_the_trained_tensors():
    for name, expected in (("digits_cnn", ["fc2.weight", "fc2.bias"]), ("digits_attn", ["head.weight"])):
        names = accuracy.fp32_names(shipped(f"{name}/w8a8.onnx"), shipped(f"{name}/fp32.onnx"), TRAINED[name])
        assert names == expected
    with pytest.raises(ValueError, match="fp32 counterpart"):
        accuracy.fp32_names(shipped("digits_cnn/w8a8.onnx"), shipped("digits_attn/fp32.onnx"), TRAINED["digits_cnn"])


def test_memory_probe_reports_the_child_not_its_parent():
    """ru_maxrss survives exec: a child measured that way reports the parent's peak. VmHWM does not."""
    ballast = np.ones(400 * 2 ** 20 // 8)   # 400 MB resident in this (parent) process
    result = memory.measure("inference", model=str(MODELS / "digits_cnn" / "w8a8.onnx"),
                            data=str(MODELS / "data" / "digits_target_train.npz"), batch=32)
    assert ballast.sum() > 0
    assert 0 < result["baseline_mb"] < result["peak_mb"] < 300
    assert result["model_mb"] == pytest.approx(result["peak_mb"] - result["baseline_mb"], abs=0.11)


def test_holdout_is_disjoint_and_fixed(target_train):
    (xa, ya), (xb, yb) = accuracy.holdout(*target_train)
    assert len(yb) == accuracy.VALIDATION and len(ya) + len(yb) == len(target_train[1])
    rows = {r.tobytes() for r in xa}
    assert not any(r.tobytes() in rows for r in xb)
    np.testing.assert_array_equal(accuracy.holdout(*target_train)[1][1], yb)


def test_select_picks_the_best_validation_mean():
    calls = []

    def run(lr, seed, tr, va, epochs, batch):
        calls.append((lr, seed))
        return {1: 0.5, 2: 0.7, 3: 0.6}[lr] + 0.01 * seed
    data = (np.zeros((150, 1, 8, 8), np.float32), np.zeros(150, np.int64))
    best, scores = accuracy.select(run, [1, 2, 3], [0, 1], data, 1, 32)
    assert best == 2 and scores[2] == pytest.approx(0.705)
    assert sorted(calls) == [(lr, s) for lr in (1, 2, 3) for s in (0, 1)]


def test_report_quotes_the_gap_to_backprop():
    q = {"w16a8 m=4": {"mean": 0.80, "std": 0.01, "lr": 128.0}}
    results = {"machine": {"cpu": "cpu", "cores": 2, "platform": "p", "python": "3", "packages": {"numpy": "2"},
                           "fgcompile": "0", "commit": "c", "date": "d"}, "settings": {"threads": 1},
               "models": {"toy": {"accuracy": {"untrained": {"fp32": 0.5, "w8a8": 0.5, "w16a8": 0.5},
                                               "budgets": {"30": {"examples": 100, "qzo_ff": q,
                                                                  "backprop": {"mean": 0.825, "std": 0.0, "lr": 0.003}}}}}}}
    text = report.markdown(results)
    assert "| QZO-FF w16a8 m=4 | 80.0 ± 1.0 (-2.5 vs bp; lr 128) |" in text
    assert "| fp32 backprop (Adam) | 82.5 ± 0.0 (lr 0.003) |" in text


def test_report_quotes_a_deep_row_against_backprop_of_its_own_tensors():
    q = {"w16a8 m=32 --last 3": {"mean": 0.90, "std": 0.0, "lr": 8.0, "options": {"last": 3}},
         "w16a8 m=32": {"mean": 0.80, "std": 0.0, "lr": 8.0, "options": {}}}
    budget = {"examples": 100, "qzo_ff": q, "backprop": {"mean": 0.82, "std": 0.0, "lr": 0.003},
              "backprop_deep": {"3": {"mean": 0.95, "std": 0.0, "lr": 0.001}}}
    results = {"machine": {"cpu": "cpu", "cores": 2, "platform": "p", "python": "3", "packages": {"numpy": "2"},
                           "fgcompile": "0", "commit": "c", "date": "d"}, "settings": {"threads": 1},
               "models": {"toy": {"accuracy": {"untrained": {"fp32": 0.5, "w8a8": 0.5, "w16a8": 0.5},
                                               "budgets": {"30": budget}}}}}
    text = report.markdown(results)
    assert "| QZO-FF w16a8 m=32 --last 3 | 90.0 ± 0.0 (-5.0 vs bp; lr 8) |" in text
    assert "| QZO-FF w16a8 m=32 | 80.0 ± 0.0 (-2.0 vs bp; lr 8) |" in text
    assert "| fp32 backprop (Adam) --last 3 | 95.0 ± 0.0 (lr 0.001) |" in text
    assert "lr chosen on a validation split" in text and "cross-validation" not in text
    results["settings"]["folds"] = 5            # run.py --folds 5: the table says how its rates were chosen
    assert "lr chosen by 5-fold cross-validation on the target train split" in report.markdown(results)


def test_reused_backprop_rows_need_the_same_tensors_seeds_and_folds():
    import run
    rows = [{"tensors": ["head.weight"], "seeds": [0, 1, 2], "mean": 0.8},       # before folds: one split
            {"tensors": ["head.weight"], "seeds": [0, 1, 2, 3, 4], "mean": 0.7},
            {"tensors": ["head.weight"], "seeds": [0, 1, 2], "folds": 5, "mean": 0.9}]
    assert run.reused_row(rows, ["head.weight"], [0, 1, 2, 3, 4], 1) == {**rows[1], "reused": True}
    assert run.reused_row(rows, ["head.weight"], [0, 1, 2], 1) == {**rows[0], "reused": True}
    assert run.reused_row(rows, ["head.weight"], [0, 1, 2], 5) == {**rows[2], "reused": True}
    assert run.reused_row(rows, ["head.weight"], [0, 1, 2, 3, 4], 5) is None
    assert run.reused_row(rows, ["head.weight"], [0, 1], 1) is None
    assert run.reused_row(rows, ["head.bias"], [0, 1, 2], 1) is None


def test_folds_validate_on_disjoint_hundreds_and_fold_0_is_the_single_split():
    x, y = np.arange(500, dtype=np.float32)[:, None], np.arange(500)
    perm = np.random.default_rng(12345).permutation(500)
    parts = [accuracy.holdout(x, y, fold) for fold in range(5)]
    assert np.array_equal(parts[0][1][1], y[perm[:100]]) and np.array_equal(parts[0][0][1], y[perm[100:]])
    seen = np.concatenate([val[1] for _, val in parts])
    assert sorted(seen.tolist()) == list(range(500))                    # every example validates once
    for (fit, val) in parts:
        assert len(val[1]) == 100 and not set(fit[1].tolist()) & set(val[1].tolist())
    with pytest.raises(ValueError, match="fold 5: 500 examples hold 5 folds of 100"):
        accuracy.holdout(x, y, 5)
    seen_pairs = []
    accuracy.select(lambda lr, seed, fit, val, ep, b: seen_pairs.append((lr, seed, int(val[1][0]))) or lr,
                    [1, 2], [7, 8], (x, y), 1, 32, folds=3)
    assert seen_pairs == [(lr, s, int(y[perm[100 * f]])) for lr in (1, 2) for f in range(3) for s in (7, 8)]


@pytest.mark.parametrize("text,seeds", [("0,1,2,3,4", [0, 1, 2, 3, 4]), ("7", [7]), ("0,x", None), ("1,1", None),
                                        ("-1", None), ("", None)])
def test_seeds_option(text, seeds):
    import click
    import run
    if seeds is None:
        with pytest.raises(click.BadParameter):
            run.parse_seeds(text)
    else:
        assert run.parse_seeds(text) == seeds


def test_report_names_the_seeds():
    results = {"machine": {"cpu": "cpu", "cores": 2, "platform": "p", "python": "3", "packages": {"numpy": "2"},
                           "fgcompile": "0", "commit": "c", "date": "d"}, "settings": {"threads": 1, "seeds": [0, 1, 2, 3, 4]},
               "models": {"toy": {"accuracy": {"untrained": {"fp32": 0.5, "w8a8": 0.5, "w16a8": 0.5},
                                               "budgets": {"30": {"examples": 100, "qzo_ff": {},
                                                                  "backprop": {"mean": 0.8, "std": 0.0, "lr": 0.003}}}}}}}
    assert "mean ± std over seeds 0,1,2,3,4;" in report.markdown(results)


@pytest.mark.parametrize("limits,message", [({"limit_mb": 20}, "over 0.0195312 GB"), ({"timeout": 0.05}, "over 0 s")])
def test_memory_probe_stops_a_job_at_its_limit(limits, message):
    """real_size.py records "needs over 8 GB" or "over 300 s" as a row's result instead of swapping or hanging."""
    with pytest.raises(memory.JobLimit, match=message):
        memory.measure("inference", model=str(MODELS / "digits_cnn" / "w8a8.onnx"),
                       data=str(MODELS / "data" / "digits_target_train.npz"), batch=32, **limits)


def test_node_estimator_picks_each_models_target_splits_and_tables_refusals():
    """benchmarks/node_estimator.py: the kws model trains on the kws splits (not digits'), and a depth node
    refuses is a table row naming the refusal, not a crash or a silent gap."""
    import node_estimator
    model, train, test = node_estimator.splits("kws_dscnn", None)
    assert model.endswith("kws_dscnn/w8a8.onnx") and train.endswith("kws_target_train.npz") \
        and test.endswith("kws_target_test.npz")
    assert node_estimator.splits("digits_attn", None)[1].endswith("digits_target_train.npz")
    rows = [{"model": "kws_dscnn", "last": 1, "estimator": "node", "spec": {"m": 8}, "seed": s, "lr": 0.5, "exported_accuracy": a}
            for s, a in ((0, 0.9), (1, 0.8))]
    rows.append({"model": "kws_dscnn", "last": 3, "estimator": "node",
                 "refused": "--estimator node: site 'block3.dw' is a Conv. It supports ..."})
    text = node_estimator.table(rows)
    assert "| 90.0 / 80.0 | 85.0 ± 7.1 |" in text
    assert "refused: --estimator node: site 'block3.dw' is a Conv |" in text
    mid = [{"model": "digits_cnn", "train": "conv2", "estimator": e, "spec": {"m": 8}, "seed": 0, "lr": 1.0,
            "exported_accuracy": 0.75, **extra} for e, extra in (("node", {}), ("node", {"higher_rates": 3}),
                                                                 ("node", {"rates": [0.5, 1.0]}), ("sign", {"lr_given": True}))]
    text = node_estimator.table(mid)
    assert "| digits_cnn | `--train conv2` | node, m = 8 | 1 |" in text
    assert "| digits_cnn | `--train conv2 (grid +3 doublings)` | node, m = 8 | 1 |" in text
    assert "`--train conv2 (rates 0.5, 1)` | node" in text and "`--train conv2 (lr given, not tuned)` | sign" in text
    # a run at another budget is its own row, not averaged into the 30-epoch one
    spans = [{"model": "kws_detect", "last": 2, "estimator": "auto", "spec": {}, "seed": 0, "lr": 0.125, "epochs": e,
              "exported_accuracy": a, "auc": 0.99, "miss_rate": 0.05} for e, a in ((30, 0.96), (300, 0.90))]
    text = node_estimator.table(spans)
    assert "| `--last 2` | auto | 0.125 | 0 | 96.0 |" in text and "| `--last 2 (300 epochs)` | auto | 0.125 | 0 | 90.0 |" in text


def test_memory_probe_runs_training_as_the_runtime_does(tmp_path):
    # benchmarks/memory.py mirrors the runtime's session options for train.onnx (it does not import fgcompile)
    from fgcompile.session import TRAINING_MEMORY_PATTERN
    path = str(MODELS / "digits_cnn/w8a8.onnx")
    assert memory._session(path, training=True).get_session_options().enable_mem_pattern is TRAINING_MEMORY_PATTERN
    assert make_session(path, training=True).get_session_options().enable_mem_pattern is TRAINING_MEMORY_PATTERN
    assert memory._session(path).get_session_options().enable_mem_pattern is True
