"""demo: the main job on a shipped model and its data, end to end.

Tasks: `digits` (the default model, digits_cnn), `kws` (keyword spotting, kws_dscnn, adapted to a
cheap microphone) and `detect` (kws_detect, one Sigmoid output: "up" against the other words, adapted to
the same microphone; judged by ROC AUC and the miss rate at a 5% false-alarm rate, metrics.FALSE_ALARM).

inspect → compile (w16a8 training of the last layer) → eval before → tune lr by 5-fold cross-validation
on the target-domain train split → train on all of it → eval after → export → eval the exported model in stock
onnxruntime; prints a before/after table and writes a loss/accuracy plot.
"""
from __future__ import annotations

import pathlib

from fgcompile import folder, models, modelio
from fgcompile.artifact import LAYOUT
from fgcompile.compiler import compile_model, write_compiled
from fgcompile.inspection import format_inspection, inspect_model
from fgcompile.report import describe_compile, describe_export, describe_tune, format_table
from fgcompile.runtime.evaluate import evaluate
from fgcompile.runtime.export import export_model
from fgcompile.runtime.trainer import Trainer
from fgcompile.runtime.tune import tune
from fgcompile.spec import TrainSpec
from fgcompile.errors import OutputError, SpecError


TASKS = {"digits": None, "kws": "kws_dscnn", "detect": "kws_detect"}   # task -> shipped model (None: the default)
# per task: (epochs, TrainSpec) the demo uses when not given (kws: measured, see models/README.md; detect:
# benchmarks/results/detect.md)
DEFAULTS = {"digits": (30, TrainSpec()), "kws": (10, TrainSpec()), "detect": (10, TrainSpec())}


def task_files(task: str = "digits") -> dict:
    """The task's w8a8 model and its data splits (a model's own `splits`, else the manifest's `data`): paths,
    or for a detector of one keyword (x, y) in memory, relabelled keyword-vs-rest (models.split)."""
    man = models.manifest()
    name = TASKS[task] or man["default"]
    entry = man["models"][name]
    splits = entry.get("splits", man["data"])
    return {"model": models.path(entry["variants"]["w8a8"]["file"]),
            **{k: models.split(name, k) if "keyword" in entry else models.path(v) for k, v in splits.items()}}


def run_demo(out_dir, epochs: int | None = None, batch: int = 32, spec: TrainSpec | None = None, echo=print,
             progress: bool = True, task: str = "digits", force: bool = False) -> dict:
    """Run the demo into OUT_DIR: a new or empty folder, or an earlier demo's, whose compiled folder (and
    its training), adapted.onnx and training.png it replaces. Files the user added to OUT_DIR/compiled
    would go with it: they need force."""
    files = task_files(task)
    epochs = DEFAULTS[task][0] if epochs is None else epochs
    spec = spec or DEFAULTS[task][1]
    out = pathlib.Path(out_dir)
    if epochs < 1 or batch < 1:
        raise SpecError(f"--epochs {epochs}: the demo trains at least one epoch.")
    folder.recover(out)
    folder.check_replaceable(out, [files["model"]], kind="demo")
    folder.check_replaceable(out / "compiled", [files["model"]], force, own_training=True)
    if not (out / LAYOUT.marker).exists():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:   # e.g. the default -o in a read-only working folder
            raise OutputError(f"{modelio.real_path(out)}: cannot write here ({exc.strerror}). Pass -o DIR with a "
                              "writable folder.") from None
        modelio.save_json(out / LAYOUT.marker, {"kind": "demo"})
    source = modelio.load_model(files["model"])
    echo(f"model: {files['model'].relative_to(models.ROOT.parent)}\n")
    echo(format_inspection(inspect_model(source, m=spec.m, bits=spec.bits, headroom=spec.headroom)) + "\n")
    from fgcompile.runtime.data import load_data
    train = files["target_train"]
    train_x = (train if isinstance(train, tuple) else load_data(train))[0]   # whitening calibrates on it only
    compiled = compile_model(source, spec, calibration=train_x)
    write_compiled(compiled, out / "compiled", force, source_path=files["model"], own_training=True)
    echo(f"compiled: {out / 'compiled'}")
    for line in describe_compile(compiled.contract):
        echo(f"  {line}")
    before = {d: evaluate(files["model"], files[d]) for d in ("source_test", "target_test")}
    trainer = Trainer(out / "compiled")
    # the rate by 5-fold cross-validation on the training split, at the demo's budget; train then uses it
    record = tune(trainer, files["target_train"], epochs=epochs, batch=batch, echo=lambda s: echo(f"  {s}"))
    echo(f"tune: {describe_tune(record)}")
    history = trainer.fit(files["target_train"], files["target_test"], epochs=epochs, batch=batch,
                          progress=progress, restart=True)
    after = {d: evaluate(out / "compiled", files[d]) for d in ("source_test", "target_test")}
    report = export_model(out / "compiled", out / "adapted.onnx", force=True)   # the demo folder's own file
    exported = {d: evaluate(out / "adapted.onnx", files[d]) for d in ("source_test", "target_test")}
    echo("")
    for line in before_after_table(before, after, exported):
        echo(line)
    for name, r in report.items():
        echo(f"export: {name} {describe_export(r)}")
    adapted = modelio.load_model(out / "adapted.onnx")
    same = [n.op_type for n in source.graph.node] == [n.op_type for n in adapted.graph.node]
    echo(f"export: {'the same' if same else 'NOT the same'} {len(source.graph.node)} nodes (op types, in order) "
         "as the input model")
    metric = ("miss_rate", f"miss rate at {before['target_test']['false_alarm']:.0%} false alarms") \
        if is_detection(before) else ("accuracy", "accuracy")
    plot = plot_history(history, before["target_test"][metric[0]], out / "training.png", *metric)
    echo(f"\nexported: {out / 'adapted.onnx'}\nplot: {plot}")
    return {"before": before, "after": after, "exported": exported, "history": history, "same_structure": same}


def is_detection(results: dict) -> bool:
    """Whether evaluate's results per split are a Sigmoid head's (metrics.detection: auc, miss_rate)."""
    return "miss_rate" in results["target_test"]


def before_after_table(before: dict, after: dict, exported: dict) -> list[str]:
    """The demo's table: accuracy per test split; for a detector also the ROC AUC and the miss rate at the
    false-alarm rate they were read at."""
    splits = ("target_test", "source_test")
    if not is_detection(before):
        return format_table(("split", "before", "after", "exported"),
                            [(d, *(f"{r[d]['accuracy']:.2%}" for r in (before, after, exported))) for d in splits],
                            right=(1, 2, 3))
    fa = before["target_test"]["false_alarm"]
    metrics = (("accuracy", "accuracy", "{:.2%}"), ("auc", "AUC", "{:.4f}"),
               ("miss_rate", f"miss@{fa:.0%}FA", "{:.2%}"))
    return format_table(("split", "metric", "before", "after", "exported"),
                        [(d, label, *(fmt.format(r[d][key]) for r in (before, after, exported)))
                         for d in splits for key, label, fmt in metrics], right=(2, 3, 4))


def plot_history(history: list[dict], start: float, path, metric: str = "accuracy",
                 label: str = "accuracy") -> pathlib.Path:
    """Loss per epoch, and the target-test `metric` (a history's val_<metric>) from its value `start` before
    training."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train (mean of ± branches)")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="target test")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax2.plot([0] + epochs, [start] + [h[f"val_{metric}"] for h in history], label="target test")
    ax2.set(xlabel="epoch", ylabel=label, title=f"target-domain {label}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    return modelio.save_figure(fig, path, dpi=100)
