"""`fgcompile demo --task detect` (issue #31): the shipped keyword detector (kws_detect, one Sigmoid output)
adapted to the cheap microphone on its relabelled target-train split; the target-domain miss rate at 5%
false alarms falls by at least half, and the exported int8 model keeps the input's nodes."""
import onnx

from conftest import MODELS
from fgcompile import models
from fgcompile.adapt import before_after_table
from test_bad_input_catalogue import invoke, refused, snapshot


def table(output: str) -> dict:
    """{(split, metric): [before, after, exported]} of the demo's printed table (% and AUC as printed)."""
    return {(l.split()[0], l.split()[1]): [float(v.rstrip("%")) for v in l.split()[2:]] for l in output.splitlines()
            if l.startswith(("target_test ", "source_test "))}


def test_detect_demo_halves_the_target_miss_rate(tmp_path):
    # 4 of the demo's 10 epochs: at 3 the miss rate sat on the bar, under it on an AVX2 CPU and one positive of 128
    # over it (12.5% against 12.1%) on an AVX-512 VNNI one (same packages; its training graph matched the reference
    # evaluator there, so the CPU moved something before it, e.g. a float kernel in calibration); at 4: 9.4%
    r = invoke("demo", "--task", "detect", "-o", tmp_path / "d", "--epochs", 4)
    assert r.exit_code == 0, r.output
    rows = table(r.output)
    shipped = models.manifest()["models"]["kws_detect"]["variants"]["w8a8"]
    before, after, exported = rows[("target_test", "miss@5%FA")]
    assert abs(before - 100 * shipped["target_test_miss_rate"]) <= 0.01, rows   # the shipped model, as recorded
    assert after <= before / 2 and exported <= before / 2, rows                  # the bar
    auc = rows[("target_test", "AUC")]
    assert auc[1] > auc[0] and abs(auc[2] - auc[1]) <= 0.005, rows               # int8 re-quantization
    assert rows[("source_test", "AUC")][2] >= 0.98, rows                         # clean speech kept
    assert "kws_detect/w8a8.onnx" in r.output and "loss=bce" in r.output and "export: the same" in r.output
    src, out = onnx.load(MODELS / "kws_detect" / "w8a8.onnx"), onnx.load(tmp_path / "d" / "adapted.onnx")
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in src.graph.node]
    assert (tmp_path / "d" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_detect_demo_with_zero_epochs_writes_nothing(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("mine")
    before = snapshot(tmp_path / "d")
    refused(invoke("demo", "--task", "detect", "-o", tmp_path / "d", "--epochs", 0), "--epochs 0")
    assert snapshot(tmp_path / "d") == before


def test_table_adds_auc_and_miss_rate_for_a_detector():
    det = {"accuracy": 0.9, "auc": 0.95, "miss_rate": 0.25, "false_alarm": 0.05}
    r = {"target_test": det, "source_test": {**det, "miss_rate": 0.0}}
    lines = before_after_table(r, r, r)
    assert lines[0].split() == ["split", "metric", "before", "after", "exported"]
    assert [l.split()[:3] for l in lines[-6:]] == [
        ["target_test", "accuracy", "90.00%"], ["target_test", "AUC", "0.9500"], ["target_test", "miss@5%FA", "25.00%"],
        ["source_test", "accuracy", "90.00%"], ["source_test", "AUC", "0.9500"], ["source_test", "miss@5%FA", "0.00%"]]
    plain = {"target_test": {"accuracy": 0.5, "loss": 1.0}, "source_test": {"accuracy": 0.75, "loss": 0.5}}
    assert before_after_table(plain, plain, plain)[-2].split() == ["target_test", "50.00%", "50.00%", "50.00%"]
