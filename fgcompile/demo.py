"""demo: the main job on a shipped model and its data, end to end (fgcompile/adapt.py on the task's files).

Tasks: `digits` (the default model, digits_cnn), `kws` (keyword spotting, kws_dscnn, adapted to a
cheap microphone) and `detect` (kws_detect, one Sigmoid output: "up" against the other words, adapted to
the same microphone; judged by ROC AUC and the miss rate at a 5% false-alarm rate, metrics.FALSE_ALARM).

inspect → adapt on the target-domain train split, the source-domain train split replayed alongside it (so
the model keeps the source domain; replay=False trains on the target split alone), reporting both test
splits.
"""
from __future__ import annotations

from fgcompile import models, modelio
from fgcompile.adapt import run_adapt
from fgcompile.inspection import format_inspection, inspect_model
from fgcompile.errors import SpecError
from fgcompile.spec import DEFAULT_HEADROOM, DEFAULT_M, TrainSpec


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
             progress: bool = True, task: str = "digits", force: bool = False, replay: bool = True,
             quiet: bool = False) -> dict:
    """Run the demo into OUT_DIR: a new or empty folder, or an earlier demo's, whose compiled folder (and
    its training), adapted.onnx and training.png it replaces. Files the user added to OUT_DIR/compiled
    would go with it: they need force. quiet: only the table and the files written."""
    files = task_files(task)
    epochs = DEFAULTS[task][0] if epochs is None else epochs
    spec = spec or DEFAULTS[task][1]
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise SpecError(f"--epochs {epochs!r}: the demo trains at least one epoch.")
    detail = (lambda _s: None) if quiet else echo
    detail(f"model: {files['model'].relative_to(models.ROOT.parent)}\n")
    inspected = inspect_model(modelio.load_model(files["model"]), m=spec.m or DEFAULT_M["sign"], bits=spec.bits,
                              headroom=spec.headroom or DEFAULT_HEADROOM)
    detail(format_inspection(inspected) + "\n")
    return run_adapt(files["model"], files["target_train"], out_dir, epochs=epochs, batch=batch, spec=spec,
                     val=files["target_test"], source=files["source_test"],
                     replay=files["source_train"] if replay else None, force=force, echo=detail, show=echo,
                     progress=progress and not quiet, kind="demo")
