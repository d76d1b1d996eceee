"""adapt: the whole job in one call, as `fgcompile adapt` and the demo run it.

compile (the training data as whitening calibration) → eval before → tune lr by 5-fold cross-validation at
the epochs it will train → train on all of it → eval after → export → eval the exported model in stock
onnxruntime; returns (and prints) a before/after table and writes a loss/accuracy plot.

OUT holds compiled/ (the training folder), adapted.onnx and training.png; fgcompile writes it as a folder of
its `kind` (adapt, or demo) and replaces only such a folder. With `replay` (source-domain examples) the
training data is the target data followed by them, for compile, tune and train alike: the model then keeps
the source domain it was deployed for (benchmarks/README.md has the measured trade-off).
"""
from __future__ import annotations

import pathlib

from fgcompile import folder, heads, modelio
from fgcompile.artifact import LAYOUT
from fgcompile.compiler import compile_model, write_compiled
from fgcompile.errors import OutputError, SpecError
from fgcompile.report import describe_compile, describe_export, describe_tune, format_table
from fgcompile.runtime.data import replayed
from fgcompile.runtime.evaluate import evaluate, read_as
from fgcompile.runtime.export import export_model
from fgcompile.runtime.program import session_of
from fgcompile.runtime.trainer import Trainer
from fgcompile.runtime.tune import tune
from fgcompile.spec import RunDefaults, TrainSpec

ADAPTED, PLOT = "adapted.onnx", "training.png"


def default_out(model) -> pathlib.Path:
    """`<model stem>-adapted` in the working folder."""
    return pathlib.Path(f"{pathlib.Path(model).stem}-adapted")


def check_out(out, model_path, kind: str, force: bool, files=(ADAPTED, PLOT), inputs=()) -> None:
    """Refuse OUT unless it is new, empty, or an earlier run's of `kind`, whose compiled folder and `files`
    the run replaces. Files the user added to OUT/compiled would go with it: they need force. inputs: other
    files the run reads (none may be inside OUT)."""
    out = pathlib.Path(out)
    folder.recover(out)
    folder.check_replaceable(out, [model_path, *inputs], kind=kind)
    folder.check_replaceable(out / "compiled", [model_path, *inputs], force, own_training=True)
    for name in files:
        if (out / name).is_dir():
            raise OutputError(f"{out / name}: is a folder; {kind} writes its {name} there. Move it away.")


def make_out(out: pathlib.Path, kind: str) -> None:
    """OUT created and marked as a `kind` folder of fgcompile's (kept as it is if it already is one)."""
    if not (out / LAYOUT.marker).exists():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:   # e.g. the default -o in a read-only working folder
            raise OutputError(f"{modelio.real_path(out)}: cannot write here ({exc.strerror}). Pass -o DIR with a "
                              "writable folder.") from None
        modelio.save_json(out / LAYOUT.marker, {"kind": kind})


def run_adapt(model, data, out=None, epochs: int = RunDefaults.adapt_epochs, batch: int = RunDefaults.batch,
              spec: TrainSpec | None = None, val=None, source=None, replay=None, force: bool = False,
              echo=print, progress: bool = True, kind: str = "adapt", show=None) -> dict:
    """Adapt MODEL (a path) to DATA (a .npz path, or (x, y)) into OUT. val: target-domain test data (else the
    table reports DATA itself); source: source-domain test data (the table reports what is kept); replay:
    source-domain training examples trained alongside DATA. echo prints the steps, show (default: echo) the
    table and the files written. Returns before/after/exported per reported set,
    the history and whether the export keeps the model's nodes."""
    spec, show = spec or TrainSpec(), show or echo
    for flag, value in (("--epochs", epochs), ("--batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SpecError(f"{flag} {value!r}: takes a whole number of at least 1.")
    out = pathlib.Path(out if out is not None else default_out(model))
    check_out(out, model, kind, force)   # refused before anything is read
    source_model = modelio.load_model(model)
    sets = {"target_test" if val is not None else "target_train": val if val is not None else data}
    if source is not None:
        sets["source_test"] = source
    before = {name: evaluate(model, d) for name, d in sets.items()}   # checks each set before anything compiles
    sess, head = session_of(source_model, model), heads.head_of(source_model).kind
    train = read_as(sess, data, "--data", head)
    replay = None if replay is None else read_as(sess, replay, "--replay", head)
    if replay is not None:
        train = replayed(train, replay)
    compiled = compile_model(source_model, spec, calibration=train[0])  # whitening calibrates on what it trains on
    make_out(out, kind)   # the first write, once every input has been read and checked
    write_compiled(compiled, out / "compiled", force, source_path=model, own_training=True)
    echo(f"compiled: {out / 'compiled'}")
    for line in describe_compile(compiled.contract):
        echo(f"  {line}")
    trainer = Trainer(out / "compiled")
    # the rate by 5-fold cross-validation on the training data, at the budget it then trains
    record = tune(trainer, train, epochs=epochs, batch=batch, echo=lambda s: echo(f"  {s}"))
    echo(f"tune: {describe_tune(record)}")
    history = trainer.fit(train, val, epochs=epochs, batch=batch, progress=progress, restart=True)
    after = {name: evaluate(out / "compiled", d) for name, d in sets.items()}
    report = export_model(out / "compiled", out / ADAPTED, force=True)   # the run's own file
    exported = {name: evaluate(out / ADAPTED, d) for name, d in sets.items()}
    adapted = modelio.load_model(out / ADAPTED)
    same = [n.op_type for n in source_model.graph.node] == [n.op_type for n in adapted.graph.node]
    first = next(iter(sets))
    metric = ("miss_rate", f"miss rate at {before[first]['false_alarm']:.0%} false alarms") \
        if is_detection(before) else ("accuracy", "accuracy")
    plot = plot_history(history, before[first][metric[0]], out / PLOT, *metric) if val is not None else None
    show("")
    for line in before_after_table(before, after, exported):
        show(line)
    for name, r in report.items():
        echo(f"export: {name} {describe_export(r)}")
    echo(f"export: {'the same' if same else 'NOT the same'} {len(source_model.graph.node)} nodes (op types, in order) "
         "as the input model")
    show(f"\nexported: {out / ADAPTED}" + (f"\nplot: {plot}" if plot else ""))
    return {"before": before, "after": after, "exported": exported, "history": history, "same_structure": same,
            "out": str(out), "adapted": str(out / ADAPTED), "lr": record["choice"]["lr"],
            "examples": {"trained": len(train[1]), "replayed": 0 if replay is None else len(replay[1])}}


def is_detection(results: dict) -> bool:
    """Whether evaluate's results per set are a Sigmoid head's (metrics.detection: auc, miss_rate)."""
    return "miss_rate" in next(iter(results.values()))


def before_after_table(before: dict, after: dict, exported: dict) -> list[str]:
    """Accuracy per reported set before, after training and exported; for a detector also the ROC AUC and the
    miss rate at the false-alarm rate they were read at."""
    sets = list(before)
    if not is_detection(before):
        return format_table(("split", "before", "after", "exported"),
                            [(d, *(f"{r[d]['accuracy']:.2%}" for r in (before, after, exported))) for d in sets],
                            right=(1, 2, 3))
    fa = before[sets[0]]["false_alarm"]
    metrics = (("accuracy", "accuracy", "{:.2%}"), ("auc", "AUC", "{:.4f}"),
               ("miss_rate", f"miss@{fa:.0%}FA", "{:.2%}"))
    return format_table(("split", "metric", "before", "after", "exported"),
                        [(d, label, *(fmt.format(r[d][key]) for r in (before, after, exported)))
                         for d in sets for key, label, fmt in metrics], right=(2, 3, 4))


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
