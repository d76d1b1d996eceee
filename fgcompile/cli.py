"""The fgcompile command line: parse flags, call the API, print. No logic the API lacks."""
from __future__ import annotations

import json
import logging
import sys

import click

from fgcompile import __version__, config
from fgcompile.errors import FgcompileError
from fgcompile.runtime.conformance import MAX_STEPS
from fgcompile.runtime.metrics import FALSE_ALARM
from fgcompile.spec import (BITS, BRANCH_FORMS, DEFAULT_HEADROOM, DEFAULT_M, DETECTOR_HEADROOM, ESTIMATORS, FORWARDS, GRID_DEFAULTS, HEADROOMS, LOSSES, NODE_SCHEDULES,
                            PERTURBATIONS, PRECONDITIONS, ROUNDINGS, SCHEDULES, SPARSE_MODES, RunDefaults, TrainSpec)


LOG_LEVELS = ["debug", "info", "warning", "error"]
JSON = "fgcompile.json"   # ctx.meta key: the command was asked for --json (on the command line or in --config)


class Group(click.Group):
    """Turns FgcompileError into a one-paragraph message and exit status 2, never a traceback. Under
    --json an error (click's usage errors too) is also one JSON object on stdout, {"error", "kind"}, so
    a pipeline reading stdout always gets JSON."""

    def add_command(self, cmd, name=None):
        # --log-level after the command too (`fgcompile compile --log-level debug ...`); it wins over the one before
        cmd.params.append(click.Option(["--log-level"], type=click.Choice(LOG_LEVELS), is_eager=True,
                                       expose_value=False, callback=_log_level_after,
                                       help="As `fgcompile --log-level`, given after the command."))
        super().add_command(cmd, name)

    def parse_args(self, ctx, args):
        ctx.meta["fgcompile.args"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FgcompileError as exc:
            logging.getLogger("fgcompile").debug("the error's traceback", exc_info=True)
            self._json_error(ctx, str(exc), type(exc).__name__)
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except click.UsageError as exc:
            self._json_error(ctx, exc.format_message(), "UsageError")
            raise                                   # click prints it on stderr and exits 2

    def _json_error(self, ctx, message: str, kind: str) -> None:
        cmd = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
        flag = next((p for p in cmd.params if p.name == "as_json"), None) if cmd else None
        args = ctx.meta.get("fgcompile.args", [])
        args = args[:args.index("--")] if "--" in args else args
        # the flag's callback has not run when parsing failed before it, so look at the words too
        if flag is not None and (ctx.meta.get(JSON) or set(flag.opts) & set(args)):
            click.echo(json.dumps({"error": message, "kind": kind}))


@click.group(cls=Group)
@click.version_option(__version__)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="warning",
              show_default=True, help="Python logging level of fgcompile's messages (on stderr).")
def main(log_level):
    """Compile quantized ONNX inference graphs into forward-gradient training graphs (QZO-FF).

    Shell completion (bash): eval "$(_FGCOMPILE_COMPLETE=bash_source fgcompile)"
    """
    set_log_level(log_level)


def set_log_level(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)


def _log_level_after(_ctx, _param, level):
    if level is not None:
        set_log_level(level)


def json_option(what: str = "the result as one JSON object"):
    def note(ctx, _param, value):
        if value:
            ctx.meta[JSON] = True
        return value
    return click.option("--json", "as_json", is_flag=True, callback=note,
                        help=f"Print {what} on stdout; an error as {{\"error\": …, \"kind\": …}} (exit 2).")


def session_options(f):
    from fgcompile.session import MAX_THREADS, OPTIMIZATION, SessionSettings
    options = [
        click.option("--threads", type=click.IntRange(0, MAX_THREADS), default=SessionSettings.threads,
                     show_default=True, help="onnxruntime intra-op threads (0: its default; at most 4 per CPU core)."),
        click.option("--optimization", type=click.Choice(list(OPTIMIZATION)), default=SessionSettings.optimization,
                     show_default=True, help="onnxruntime graph optimization level (disable: the ONNX ops as written)."),
        click.option("--provider", default=SessionSettings.provider, show_default=True,
                     help="onnxruntime execution provider (falls back to CPU for what it cannot run)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def backend_options(what: str):
    """--backend and --address of a command whose `what` can run as Ray tasks."""
    def add(f):
        f = click.option("--address", default=None, metavar="HOST:PORT",
                         help="The Ray cluster to run on (with --backend ray) [RAY_ADDRESS; with neither, ray.init() "
                              "starts a local instance, or joins the one `ray start` began on this machine]. Its "
                              "workers read the input files at the same paths (one host or a shared filesystem).")(f)
        return click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                            help=f"local: {what} on this machine; ray: one Ray task each, rerun when its worker "
                                 "is lost (pip install 'fgcompile[ray]').")(f)
    return add


def make_session_settings(kw):
    from fgcompile.session import SessionSettings
    return SessionSettings(threads=kw.pop("threads"), optimization=kw.pop("optimization"), provider=kw.pop("provider"))


GRID_NAMES = {16: "16-bit", 14: "int8 widened (--bits 16, headroom 4: a 14-bit grid)", 8: "--bits 8"}


def _grid_defaults(i: int) -> str:
    return ", ".join(f"{GRID_NAMES.get(bits, f'{bits}-bit')} {values[i]:g}" for bits, values in GRID_DEFAULTS.items())


def spec_option(flag: str, field: str, choices=None, **kw):
    """A compile option whose default is TrainSpec's `field` (choices are shown as strings; a choice left to
    the plan, None in TrainSpec, is "auto")."""
    default = getattr(TrainSpec, field)
    if choices is not None:
        kw["type"], default = click.Choice([str(c) for c in choices]), "auto" if default is None else str(default)
    return click.option(flag, field, default=default, show_default=default not in (None, ""), **kw)


def _auto_int(value: str) -> int | None:
    """A numeric choice as TrainSpec takes it: "auto" is None (the plan decides)."""
    return None if value == "auto" else int(value)


def spec_options(f):
    options = [
        click.option("--train", "train", multiple=True, metavar="REGEX",
                     help="Train weight sites whose site/weight/bias name matches (repeatable)."),
        spec_option("--last", "last", help="Train the N weight sites nearest the output (frozen ones not counted)."),
        click.option("--freeze", "freeze", multiple=True, metavar="REGEX",
                     help="Never train the weight sites whose site/weight/bias name matches, even when --last or "
                          "--train reaches them (repeatable; e.g. a fixed STFT basis)."),
        click.option("--no-bias", is_flag=True, help="Do not train the biases of the chosen sites."),
        spec_option("--m", "m", type=int, help="Perturbations per step (2m forwards) [by the estimator: "
                    + ", ".join(f"{k} {v}" for k, v in DEFAULT_M.items()) + "]."),
        spec_option("--eps", "eps", type=int,
                    help=f"Perturbation size ε in LSBs [by the training grid's bits: {_grid_defaults(0)}]."),
        spec_option("--lr", "lr", type=float,
                    help=f"Learning rate η in LSBs per step [by the training grid's bits: {_grid_defaults(1)}]."),
        spec_option("--lr-shift", "lr_shift", help="η = lr_input / 2**shift (fixed point)."),
        spec_option("--perturbation", "perturbation", PERTURBATIONS),
        spec_option("--density", "density", help="Nonzero fraction of ternary z."),
        spec_option("--loss", "loss", LOSSES,
                    help="ce/mse: class scores, one class index per example; bce: 0/1 labels on the logit before a "
                         "Sigmoid output [batch, K] (a detector, or K labels per example); auto: bce for a Sigmoid "
                         "output, else ce."),
        spec_option("--estimator", "estimator", ESTIMATORS,
                    help="sign: Sign-m-SPSA; spsa: quantized m-SPSA; node: perturb each trained Gemm/MatMul/Conv's "
                    "output per example (±ε output LSBs) and step by the sign of each example's loss difference "
                    "times its clean input (stacked or loop form; with --calibration the step is whitened); head: the exact "
                    "loss gradient at the logits of the output layer, in one forward (ce or bce; whitened likewise); "
                    "auto: node when more than one layer trains and node takes every site and option, head when the "
                    "output layer trains alone, else sign."),
        spec_option("--node-schedule", "node_schedule", NODE_SCHEDULES,
                    help="--estimator node: all (every direction perturbs every trained layer) or alternate "
                         "(direction i perturbs trained layer i mod L only); auto: alternate where L >= 2 perturbed "
                         "layers run over a transformer's tokens and m/L >= 4."),
        spec_option("--spsa-gain", "spsa_gain", help="m-SPSA: c = round(gain·ΔL)."),
        spec_option("--rounding", "rounding", ROUNDINGS),
        spec_option("--bits", "bits", BITS, help="16 widens int8 trained weights to int16 for training; 8 keeps int8."),
        spec_option("--seed", "seed", help="Seed of the perturbations and the data order, in [0, 2**32)."),
        spec_option("--headroom", "headroom", ("auto",) + HEADROOMS,
                    help="Train on a grid with H x the pretrained weight range; export re-quantizes to the deployed "
                         f"grid. auto: {DEFAULT_HEADROOM}, or {DETECTOR_HEADROOM} where head or node trains a one-logit "
                         "detector (its layers' steps need weights far past their pretrained range)."),
        spec_option("--precondition", "precondition", PRECONDITIONS, help="Whiten the trained layer's input (frozen, "
                    "folded back on export); auto: when --calibration is given."),
        click.option("--kernel-norm", is_flag=True, default=TrainSpec.kernel_norm,
                     help="Kernel-wise normalization: each output kernel's step gets an L1 norm proportional to "
                          "its weight's (integer; the tensor's mean step size is kept)."),
        spec_option("--sparsity", "sparsity",
                    help="Sparse update: the share of each trained tensor's elements a step leaves unchanged."),
        spec_option("--sparse-mode", "sparse_mode", SPARSE_MODES,
                    help="Which elements a sparse step updates: topk (largest |ĝ|), random (hashed), threshold "
                         "(|ĝ| >= sparsity·max|ĝ|)."),
        spec_option("--momentum", "momentum", help="Momentum-guided sampling: the share of each perturbation drawn "
                    "as the sign of an int32 momentum buffer (extra training state)."),
        spec_option("--sharpness", "sharpness",
                    help="Sharpness-aware perturbation: centre the ±ε pair ρ LSBs up the momentum's slope."),
        click.option("--keep-requant", is_flag=True,
                     help="Branches keep the activation requantization inside the trained layers (default: "
                          "read as float, so ±ε steps do not vanish on the uint8 grid)."),
        spec_option("--branches", "branches", BRANCH_FORMS,
                    help="How the 2m branches run: stacked (one suffix on a branch-folded batch), cloned (one copy "
                         "per branch), loop (a Loop over the 2m branches, memory near inference), auto (stacked for a "
                         "small suffix; cloned where its activations reach 4096 values per example, or where an op "
                         "has no stacking rule; node perturbation: loop)."),
        spec_option("--memory-budget", "memory_budget_mb", type=float, metavar="MB",
                    help="With --branches auto: use the loop when the stacked branch weights would exceed MB."),
        spec_option("--forward", "forward", FORWARDS,
                    help="exact: the frozen layers' integer results are computed with ops every runtime evaluates "
                         "identically, so steps match bit for bit across runtimes; qdq: they run the source's QDQ "
                         "ops, which each runtime fuses and rounds its own way (faster on onnxruntime, less memory)."),
        spec_option("--prompts", "prompts",
                    help="Append N trainable tokens at a transformer block's input (trained with the sites)."),
        spec_option("--prompt-at", "prompt_at", metavar="NODE",
                    help="The LayerNormalization whose input gets the prompts [the first over tokens]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


replay_option = click.option(
    "--replay", type=click.Path(), default=None, metavar="SOURCE.npz",
    help="Source-domain examples trained alongside --data, so the model keeps the source domain (give the same "
         "file to tune and train).")


def with_replay(trainer, data, replay):
    """--data, or --data followed by the --replay examples, read as the trainer's model reads them."""
    if replay is None:
        return data
    from fgcompile.runtime.data import replayed
    return replayed(trainer.load_data(data, "--data"), trainer.load_data(replay, "--replay"))


def make_spec(kw) -> TrainSpec:
    return TrainSpec(train=kw.pop("train"), last=kw.pop("last"), freeze=kw.pop("freeze"),
                     include_bias=not kw.pop("no_bias"), m=kw.pop("m"), eps=kw.pop("eps"), lr=kw.pop("lr"),
                     lr_shift=kw.pop("lr_shift"),
                     perturbation=kw.pop("perturbation"), density=kw.pop("density"), loss=kw.pop("loss"),
                     estimator=kw.pop("estimator"), node_schedule=kw.pop("node_schedule"), spsa_gain=kw.pop("spsa_gain"), rounding=kw.pop("rounding"),
                     bits=int(kw.pop("bits")), seed=kw.pop("seed"), requant_bypass=not kw.pop("keep_requant"),
                     branches=kw.pop("branches"), memory_budget_mb=kw.pop("memory_budget_mb"),
                     prompts=kw.pop("prompts"), prompt_at=kw.pop("prompt_at"), headroom=_auto_int(kw.pop("headroom")),
                     precondition=kw.pop("precondition"), kernel_norm=kw.pop("kernel_norm"),
                     sparsity=kw.pop("sparsity"), sparse_mode=kw.pop("sparse_mode"), momentum=kw.pop("momentum"),
                     sharpness=kw.pop("sharpness"), forward=kw.pop("forward"))


@main.command(short_help="List a model's trainable parameters and what stays float.")
@click.argument("model", type=click.Path())
@click.option("--m", "m", default=DEFAULT_M["sign"], show_default=True,
              help="Weight perturbation's perturbations per step, for the memory estimate.")
@click.option("--momentum", default=TrainSpec.momentum, show_default=True, type=float,
              help="Momentum-guided sampling share, for the memory estimate (its int32 buffer is state).")
@click.option("--sharpness", default=TrainSpec.sharpness, show_default=True, type=int,
              help="Sharpness-aware ρ, for the memory estimate (it keeps the same buffer).")
@json_option("the sites as JSON")
def inspect(model, m, momentum, sharpness, as_json):
    """List the trainable parameters of a quantized MODEL, their grid and the memory to train each,
    and the layers that stay float."""
    import dataclasses
    from fgcompile.inspection import format_inspection, inspect_graph
    from fgcompile.modelio import load_model
    rows, floats = inspect_graph(load_model(model), m=m, momentum=momentum, sharpness=sharpness)
    click.echo(json.dumps({"parameters": [dataclasses.asdict(r) for r in rows],
                           "stays_float": [dataclasses.asdict(f) for f in floats]}, indent=2)
               if as_json else format_inspection(rows, floats))


@main.command("compile", short_help="Compile a quantized model into a training folder.")
@click.argument("model", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="Output folder.")
@click.option("--force", is_flag=True, help="Replace a compiled OUT even if it holds training (checkpoint, log) or "
              "files fgcompile did not write (they are deleted).")
@click.option("--calibration", type=click.Path(), default=None,
              help="Inputs (.npz with x, y; e.g. the training data) for --precondition, frozen at compile time.")
@spec_options
@json_option()
@config.option("compile")
def compile_cmd(model, out, force, as_json, calibration, **kw):
    """Compile MODEL into OUT/train.onnx, eval.onnx, state.npz (+ source.onnx)."""
    import time
    from fgcompile.compiler import compile_model, write_compiled
    from fgcompile.modelio import load_model
    from fgcompile.report import describe_compile
    from fgcompile.runtime.data import load_calibration
    spec = make_spec(kw)
    t0 = time.perf_counter()
    source = load_model(model)
    x = load_calibration(calibration, source) if calibration else None
    compiled = compile_model(source, spec, calibration=x)
    write_compiled(compiled, out, force=force, source_path=model)
    seconds = time.perf_counter() - t0
    logging.getLogger("fgcompile.compile").info("compiled %s -> %s in %.2fs", model, out, seconds)
    if as_json:
        click.echo(json.dumps({"model": model, "out": out, "seconds": round(seconds, 3),
                               "contract": compiled.contract.to_dict()}))
        return
    click.echo(f"compiled {model} -> {out} in {seconds:.2f}s")
    for line in describe_compile(compiled.contract):
        click.echo(f"  {line}")
    for note in compiled.notes:
        click.echo(f"note: {note}", err=True)


@main.command(short_help="Train a compiled folder on data.")
@click.argument("out", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="Training .npz (x float32, y int64).")
@click.option("--val", type=click.Path(), help="Validation .npz, evaluated each epoch.")
@replay_option
@click.option("--epochs", default=RunDefaults.epochs, show_default=True)
@click.option("--batch", default=RunDefaults.batch, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.npz.")
@click.option("--restart", is_flag=True, help="Discard OUT/checkpoint.npz and the log; train from the start.")
@click.option("--allow-changed-run", is_flag=True,
              help="--resume even with other --data/--batch/--schedule (not bit-identical to one run).")
@click.option("--checkpoint-every", default=RunDefaults.checkpoint_every, show_default=True,
              help="Steps between checkpoints.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None,
              help="How lr moves over the run: cosine from lr down to 0, or constant "
                   f"[OUT/tune.json's choice, else {RunDefaults.schedule}].")
@click.option("--max-bad-steps", type=int, default=None, help="Stop after this many NaN/Inf-loss steps.")
@click.option("--lr", type=float, default=None,
              help="Learning rate in LSBs per unit of ĝ, fed as the graph's lr input (no recompile) "
                   "[OUT/tune.json's choice, else the compiled rate].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@session_options
@json_option()
@config.option("train")
def train(out, data, val, replay, epochs, batch, resume, restart, allow_changed_run, checkpoint_every, schedule,
          lr, max_bad_steps, quiet, as_json, **kw):
    """Train the compiled folder OUT on DATA; metrics go to OUT/train_log.jsonl."""
    from fgcompile.runtime.trainer import Trainer
    trainer = Trainer(out, session=make_session_settings(kw))
    history = trainer.fit(with_replay(trainer, data, replay), val, epochs=epochs, batch=batch, resume=resume, checkpoint_every=checkpoint_every,
                          schedule=schedule, max_bad_steps=max_bad_steps, progress=not (quiet or as_json),
                          restart=restart, allow_changed_run=allow_changed_run, lr=lr)
    for note in trainer.notes:
        click.echo(f"note: {note}", err=True)
    result = {"out": out, "checkpoint": f"{out}/checkpoint.npz", "step": trainer.meta["step"],
              "bad_steps": trainer.meta["bad_steps"], "history": history}
    if as_json:
        click.echo(json.dumps(result))
        return
    for h in history:
        click.echo(json.dumps(h))
    click.echo(f"state: {out}/checkpoint.npz (step {trainer.meta['step']}, bad steps {trainer.meta['bad_steps']})")


@main.command("tune", short_help="Choose the learning rate by cross-validation.")
@click.argument("out", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="Training .npz; seeded folds (or a share) of it validate.")
@replay_option
@click.option("--epochs", default=RunDefaults.epochs, show_default=True,
              help="Epochs per trial: the epochs you will train (a shorter budget favours a larger rate).")
@click.option("--batch", default=RunDefaults.batch, show_default=True)
@click.option("--seeds", default=RunDefaults.seeds, show_default=True,
              help="Runs per rate and fold (seeds S, S+1, …); scores are their mean.")
@click.option("--folds", type=int, default=None,
              help=f"K-fold cross-validation (K >= 2): every example validates once, K runs per rate and seed "
                   f"[{RunDefaults.folds}; none with --holdout].")
@click.option("--holdout", type=float, default=None,
              help=f"Validate on one held-out share of --data instead (e.g. {RunDefaults.holdout}): one run per "
                   "rate and seed.")
@click.option("--seed", type=int, default=None, help="Seed S of the split and the first run [the compiled seed].")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=RunDefaults.schedule, show_default=True,
              help="The schedule you will train with; under cosine each rate is its peak.")
@backend_options("trials one after another")
@session_options
@json_option()
@config.option("tune")
def tune_cmd(out, data, replay, epochs, batch, seeds, holdout, folds, seed, schedule, backend, address, as_json, **kw):
    """Choose the learning rate of OUT under a schedule by K-fold cross-validation on DATA (or on one
    held-out share of it); `train` then uses both (OUT/tune.json). Rates are scored by validation accuracy;
    a Sigmoid output (a detector) by validation ROC AUC; ties by the lower loss."""
    from fgcompile.api import tune
    from fgcompile.report import describe_tune
    from fgcompile.runtime.trainer import Trainer
    trainer = Trainer(out, session=make_session_settings(kw))
    record = tune(trainer, with_replay(trainer, data, replay), epochs=epochs, batch=batch, seeds=seeds, holdout=holdout, folds=folds, seed=seed,
                  schedule=schedule, backend=backend, address=address,
                  echo=None if as_json else lambda s: click.echo(s, err=True))
    if as_json:
        click.echo(json.dumps(record))
        return
    click.echo(describe_tune(record))
    click.echo(f"recorded: {out}/tune.json; `fgcompile train {out}` uses this rate and schedule unless --lr or "
               "--schedule is given")


@main.command("eval", short_help="Accuracy and loss of a model or a compiled folder.")
@click.argument("model_or_out", type=click.Path())
@click.option("--data", required=True, type=click.Path(), multiple=True,
              help="Test .npz; repeat it to report several (e.g. the target and the source domain's).")
@click.option("--false-alarm", type=float, default=FALSE_ALARM, show_default=True, metavar="F",
              help="A Sigmoid output (a detector): report the miss rate where at most this share of the negatives "
                   "fires, in (0, 1).")
@session_options
@json_option("one JSON object (with several --data: {\"results\": [one per file, with its \"data\"]})")
def eval_cmd(model_or_out, data, false_alarm, as_json, **kw):
    """Accuracy and mean cross-entropy of a model file or a compiled folder on each --data; for a Sigmoid
    output (a detector) accuracy at 0.5, binary cross-entropy, ROC AUC and the miss rate at a false-alarm rate."""
    from fgcompile.report import describe_eval
    from fgcompile.runtime.evaluate import evaluate
    session = make_session_settings(kw)
    results = [evaluate(model_or_out, d, session=session, false_alarm=false_alarm) for d in data]
    if len(data) == 1:
        click.echo(json.dumps(results[0]) if as_json else describe_eval(results[0]))
    elif as_json:
        click.echo(json.dumps({"results": [{"data": d, **r} for d, r in zip(data, results)]}))
    else:
        width = max(len(d) for d in data)
        for d, r in zip(data, results):
            click.echo(f"{d:<{width}}  {describe_eval(r)}")


@main.command(short_help="Write the trained weights into a plain QDQ model.")
@click.argument("folder", metavar="OUT", type=click.Path())
@click.option("-o", "--out", type=click.Path(), help="Adapted .onnx to write.")
@click.option("--force", is_flag=True, help="Replace an existing file that is not a model fgcompile exported.")
@click.option("--output", "output_alias", type=click.Path(), hidden=True)   # its name before -o/--out
@json_option()
def export(folder, out, output_alias, force, as_json):
    """Write the trained weights of OUT into a plain QDQ inference model."""
    from fgcompile.report import describe_export
    from fgcompile.runtime.export import export_model
    output = out or output_alias
    if output is None:
        raise click.UsageError("Missing option '-o' / '--out'.")
    report = export_model(folder, output, force)
    if as_json:
        click.echo(json.dumps({"out": output, "tensors": report}))
        return
    for name, r in report.items():
        click.echo(f"  {name}: {describe_export(r)}")
    click.echo(f"exported {output}")


@main.command(short_help="Compare chained training steps across runtimes.")
@click.argument("out", type=click.Path())
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), default=20, show_default=True,
              help="Chained training steps per runtime.")
@click.option("--data", type=click.Path(),
              help="Training .npz: its batches in the trainer's order (default: seeded random inputs).")
@click.option("--epochs", type=click.IntRange(min=1), default=RunDefaults.epochs, show_default=True,
              help="The run's epochs (train's --epochs): they set the permutation's epochs and the cosine rate.")
@click.option("--batch", type=click.IntRange(min=1), default=None, help=f"train's --batch [the model's fixed batch, else {RunDefaults.batch}].")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None,
              help=f"train's --schedule [OUT/tune.json's choice, else {RunDefaults.schedule}].")
@click.option("--lr", type=float, default=None, help="train's --lr [OUT/tune.json's choice, else the compiled rate].")
@json_option("the rows as JSON")
def verify(out, steps, data, epochs, batch, schedule, lr, as_json):
    """Run the trainer's first STEPS steps of OUT (the batches, seed and rates `fgcompile train` feeds) on
    every runtime installed here and compare them bit for bit; exits 1 when a supported runtime (onnxruntime
    at any level or thread count, the ONNX reference evaluator, OpenVINO f32) differs."""
    from fgcompile.runtime.conformance import failing, format_rows, verify as run_verify
    rows = run_verify(out, steps, data, batch=batch, epochs=epochs, schedule=schedule, lr=lr)
    click.echo(json.dumps(rows, indent=1) if as_json else format_rows(rows))
    if failing(rows):   # a supported runtime differs; informational rows (OpenVINO's default precision, tract, TVM) never fail
        from fgcompile.runtime.trainer import Trainer
        if Trainer(out).spec.forward == "qdq":
            click.echo("hint: runtimes round the frozen QDQ ops' requantizations each their own way; compile with "
                       "--forward exact to compute them identically everywhere (slower on onnxruntime).", err=True)
        sys.exit(1)


@main.command(short_help="Compile every model of a folder; a summary table.")
@click.argument("in_dir", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="One compiled folder per model + summary.json.")
@click.option("--jobs", type=int, default=None,
              help="Models compiled at once [2 processes, at most one per CPU; with --backend ray: the cluster's CPUs].")
@click.option("--timeout", default=600.0, show_default=True,
              help="Seconds one model may take before it is stopped (with --backend ray: from its task's submission).")
@click.option("--force", is_flag=True, help="Replace compiled folders in OUT that hold training or files fgcompile did "
              "not write, and an OUT/summary.json batch did not write.")
@backend_options("processes")
@spec_options
@config.option("compile")
def batch(in_dir, out, jobs, timeout, force, backend, address, **kw):
    """Compile every .onnx in IN_DIR, one process (or Ray task) per model; exits 1 if any model failed."""
    from fgcompile.batch import batch_compile, format_summary
    rows, interrupted = batch_compile(in_dir, out, make_spec(kw), jobs=jobs, timeout=timeout, force=force,
                                      backend=backend, address=address,
                                      on_done=lambda r: click.echo(f"  {r['status']:9s} {r['model']}", err=True))
    click.echo(format_summary(rows))
    click.echo(f"summary: {out}/summary.json")
    if interrupted:
        click.echo("interrupted: stopped the running models; the summary lists what finished.", err=True)
        sys.exit(130)
    if any(r["status"] != "ok" for r in rows):
        sys.exit(1)


@main.command(short_help="Adapt a model to new data in one step: compile, tune, train, export.")
@click.argument("model", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="Target-domain training .npz (x, y).")
@click.option("-o", "--out", type=click.Path(), default=None,
              help="Output folder: compiled/, adapted.onnx, training.png [MODEL's name + '-adapted'].")
@click.option("--epochs", default=RunDefaults.adapt_epochs, show_default=True,
              help="Training epochs (tune chooses lr for them; 300 gets the most from a small data set).")
@click.option("--batch", default=RunDefaults.batch, show_default=True)
@click.option("--val", type=click.Path(), help="Target-domain test .npz: reported before/after and each epoch.")
@click.option("--source", type=click.Path(), help="Source-domain test .npz: reported before/after (what is kept).")
@replay_option
@click.option("--force", is_flag=True, help="Delete files you added to OUT/compiled (adapt replaces that folder).")
@click.option("--quiet", is_flag=True, help="Print only the before/after table and the files written.")
@spec_options
@json_option()
@config.option("compile")
def adapt(model, data, out, epochs, batch, val, source, replay, force, quiet, as_json, **kw):
    """Adapt MODEL to DATA: compile it (DATA whitens the trained layers' inputs), choose the learning rate
    by 5-fold cross-validation at EPOCHS, train, export OUT/adapted.onnx and print a before/after table
    on --val (else DATA) and --source."""
    from fgcompile.adapt import run_adapt
    quiet = quiet or as_json
    result = run_adapt(model, data, out, epochs=epochs, batch=batch, spec=make_spec(kw), val=val, source=source,
                       replay=replay, force=force, echo=(lambda s: None) if quiet else click.echo,
                       show=(lambda s: None) if as_json else click.echo, progress=not quiet)
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items() if k != "history"}))


@main.command(short_help="Simulate a fleet of devices adapting a model.")
@click.argument("model", type=click.Path())
@click.option("--data", required=True, type=click.Path(),
              help="Fleet data .npz: x, y, device (0..N-1) and split (0 train, 1 test) per example.")
@click.option("-o", "--out", type=click.Path(), default=None,
              help="Output folder: compiled/, fleet.json, federated.onnx [MODEL's name + '-fleet'].")
@click.option("--rounds", default=20, show_default=True, help="Federated rounds (alone and centralized train as many "
              "epochs as the rounds add up to).")
@click.option("--local-epochs", default=1, show_default=True, help="Epochs each device trains on its data per round.")
@click.option("--batch", default=8, show_default=True, help="Examples per step (devices hold few).")
@click.option("--modes", default=",".join(("alone", "federated", "centralized")), show_default=True,
              help="What to simulate, comma-separated: alone, federated, centralized.")
@click.option("--upload", type=click.Choice(["auto", "signs", "update"]), default="auto", show_default=True,
              help="What a device sends per round: signs (weight perturbation: one bit per direction and step, the "
                   "server replays them), update (its integer weight update); auto: signs where they replay.")
@click.option("--backend", type=click.Choice(["local", "flower"]), default="local", show_default=True,
              help="local: the devices one after another here; flower: Flower's simulation engine on Ray, one "
                   "simulated node per device (pip install 'fgcompile[fleet]').")
@click.option("--address", default=None, metavar="HOST:PORT",
              help="The Ray cluster Flower runs on (with --backend flower) [RAY_ADDRESS; else a local instance].")
@click.option("--source", type=click.Path(), help="Source-domain test .npz: what each mode keeps.")
@click.option("--replay", type=click.Path(), default=None, metavar="SOURCE.npz",
              help="Source-domain training examples, dealt out to the devices and trained alongside their data, so "
                   "the model keeps the source domain.")
@click.option("--force", is_flag=True, help="Delete files you added to OUT/compiled (fleet replaces that folder).")
@click.option("--quiet", is_flag=True, help="Print only the report and the files written.")
@spec_options
@json_option()
@config.option("compile")
def fleet(model, data, out, rounds, local_epochs, batch, modes, upload, backend, address, source, replay, force, quiet,
          as_json, **kw):
    """Simulate a fleet of devices (DATA's device ids) adapting MODEL: each alone, in federated rounds, and
    centrally on their pooled data; print accuracy per device before/after, what is kept on --source and the
    bytes each device uploads per round. The peak rate is --lr, else chosen by 5-fold cross-validation on the
    devices' pooled training data."""
    from fgcompile.fleet import run_fleet
    quiet = quiet or as_json
    report = run_fleet(model, data, out, rounds=rounds, local_epochs=local_epochs, batch=batch,
                       modes=[m.strip() for m in modes.split(",") if m.strip()], upload=upload, backend=backend,
                       address=address, source=source, replay=replay, spec=make_spec(kw), force=force,
                       echo=(lambda s: None) if quiet else click.echo, show=(lambda s: None) if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(report))


@main.command(short_help="Adapt a shipped model to its target domain.")
@click.option("-o", "--out", default="fgcompile-demo", show_default=True, type=click.Path())
@click.option("--epochs", type=int, default=None, help="Training epochs (default: 30 for digits, 10 for kws and detect).")
@click.option("--task", type=click.Choice(["digits", "kws", "detect"]), default="digits", show_default=True,
              help="digits: the default model (8x8 digits, a rotated sensor); kws: keyword spotting on "
                   "synthesized speech, heard through a cheap microphone; detect: a one-keyword detector (\"up\" "
                   "vs the rest, a Sigmoid output) on the same microphone, judged by AUC and the miss rate at 5% "
                   "false alarms.")
@click.option("--replay/--no-replay", default=True, show_default=True,
              help="Train the source-domain train split alongside the target's, so the source domain is kept.")
@click.option("--quiet", is_flag=True, help="Print only the before/after table and the files written.")
@click.option("--force", is_flag=True, help="Delete files you added to OUT/compiled (the demo replaces that folder).")
def demo(out, epochs, task, replay, quiet, force):
    """The main job on a shipped model: adapt it to the target domain on-device style."""
    from fgcompile.demo import run_demo
    run_demo(out, epochs=epochs, echo=click.echo, task=task, force=force, replay=replay, quiet=quiet)


if __name__ == "__main__":
    main()
