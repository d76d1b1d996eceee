"""The one place that composes the passes from a TrainSpec: a list, run in a loop.

Each entry is a Pass (passes/context.py): `run(graph, ctx) -> graph` with the Context fields it reads
and adds. Before `load` the graph is the onnx.ModelProto; from `load` to `finalize` it is the gs.Graph
the passes edit; `finalize` returns the training ModelProto. Around every pass the loop checks that
what it reads is set and that it set what it adds (and returned a graph without dangling inputs); an
unexpected exception becomes a CompileError naming the pass and the passes before it.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from fgcompile import __version__, bounds, grid
from fgcompile.artifact import Compiled, Contract, EvalContract, Inputs, LrNumerator, Outputs, Probes
from fgcompile.errors import CompileError, FgcompileError, ModelError
from fgcompile.session import make_session
from fgcompile.spec import READS_ACTIVATIONS, TrainSpec
from . import (activations, analyze, canonicalize, estimate, exact_forward, finalize, floatgrid, head, integer_products,
               kernelnorm, lift, loss,
               momentum, node, opset, pair, plan, precondition, prng, prompts, select, sparsify, update, widen)
from .context import Context, Pass
from .dialects import quant_dtype
from .formulas import TIE_TOLERANCE


def check_source(model: onnx.ModelProto) -> None:
    """Refuse what no pass should see: an opset outside what we and onnxruntime support, an invalid
    graph, or one onnxruntime cannot load (the compiled graph would fail the same way); and, first, one past
    fgcompile/bounds.py's limits."""
    bounds.check_node_count(model)
    version = opset.version(model)
    if version < opset.MIN_OPSET:
        raise ModelError(f"the model is opset {version}; QDQ quantization needs opset >= {opset.MIN_OPSET}. "
                         "Re-export it at opset 21.")
    if version > onnx.defs.onnx_opset_version():
        raise ModelError(f"the model is opset {version}, newer than this onnx supports "
                         f"({onnx.defs.onnx_opset_version()}). Re-export it at opset 21.")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"the input model fails onnx.checker ({str(exc).splitlines()[0]}); fix or re-export "
                         "it before compiling.") from None
    bounds.check_declared_sizes(model)
    try:
        make_session(quant_dtype.loadable(model))     # as canonicalize will leave it
    except Exception as exc:
        reason = str(exc).split(" : ")[-1].splitlines()[0][:300]
        raise ModelError(quant_dtype.propagation_failure(model, reason) or f"onnxruntime {ort.__version__} cannot "
                         f"load the input model ({reason}). Re-export it at opset 21 with ops onnxruntime "
                         "supports.") from None


def _check(model: onnx.ModelProto, ctx: Context) -> onnx.ModelProto:
    check_source(model)
    return model


def _load(model: onnx.ModelProto, ctx: Context) -> gs.Graph:
    """The canonical source as the gs.Graph the passes edit, at opset >= BASE_OPSET, shapes inferred."""
    return opset.imported(model, opset.BASE_OPSET)


def _resolve(graph: gs.Graph, ctx: Context) -> gs.Graph:
    """eps/lr left unset follow the training grid's resolution (fgcompile/grid.py), the loss the output's
    head (TrainSpec.for_head); the spec records whether whitening happened."""
    bits = grid.resolution_bits([t.contract() for t in ctx.trainables])
    ctx.spec = dataclasses.replace(ctx.spec.resolve(bits).for_head(ctx.io.head),
                                   precondition="whiten" if ctx.preconditioned or ctx.step_whitening else "none")
    return graph


def _eval_graph(graph: gs.Graph, ctx: Context) -> gs.Graph:
    """eval.onnx: the lifted inference graph (trained tensors as inputs), before any training node."""
    copy = graph.copy()
    tensors = copy.tensors()
    contract = EvalContract(ctx.io.data_input, ctx.io.data_inputs, ctx.io.output, [t.name for t in ctx.trainables],
                            version=__version__)
    ctx.eval_model = finalize.to_model(copy, [tensors[n] for n in ctx.io.data_inputs + [t.name for t in ctx.trainables]],
                                       [tensors[ctx.io.output]], contract)
    return graph


def _contract(graph: gs.Graph, ctx: Context) -> gs.Graph:
    """The training graph's I/O contract (train, export and the reference read it)."""
    spec, z = ctx.spec, ctx.perturbations.z
    ctx.contract = Contract(
        spec=spec, inputs=Inputs(ctx.io.data_input), data_inputs=ctx.io.data_inputs, outputs=Outputs(),
        state=[t.contract() for t in ctx.trainables] + ctx.buffers.entries,
        lr_numerator=LrNumerator(spec.lr_shift, spec.lr_numerator, ctx.update.lr_max),
        model_output=ctx.io.output, loss_tap=ctx.io.loss_tap, head=ctx.io.head, branches=ctx.branches.form,
        branches_reason=ctx.branches.reason, tie_tolerance=TIE_TOLERANCE, stream=prng.STREAM,
        probes=Probes(ctx.estimate.coefficients.name,   # the loop form holds no whole z to probe
                      [] if ctx.branches.form == "loop" or spec.estimator in READS_ACTIVATIONS else
                      [z[t.name].name for t in ctx.trainables]),
        precondition=ctx.preconditioned, step_whitening=[w for w, *_ in ctx.step_whitening or []],
        estimator_reason=ctx.plan.reason, version=__version__)
    return graph


def _by_estimator(weight: Pass, others: dict[str, Pass]) -> Pass:
    """The pass of weight perturbation, or under --estimator node or head that estimator's (passes/node.py,
    passes/head.py); the chosen pass's own reads and adds are checked inside. What only the others add is
    left empty ([]) by weight perturbation."""
    extra = tuple(dict.fromkeys(f for p in others.values() for f in p.adds if f not in weight.adds))

    def run(graph, ctx):
        if ctx.spec.estimator in others:
            return run_passes([others[ctx.spec.estimator]], graph, ctx)
        graph = weight.run(graph, ctx)
        for field in extra:
            setattr(ctx, field, [])
        return graph
    return Pass(weight.name, run, reads=weight.reads, adds=weight.adds + extra)


PASSES = [
    Pass("check", _check),
    canonicalize.PASS,
    prompts.PASS,
    Pass("load", _load, reads=("source",)),
    activations.PASS,     # int8 activation pairs as uint8 (the same values)
    analyze.PASS,
    select.PASS,
    plan.PASS,            # the estimator and m (--estimator auto), read by every pass below
    floatgrid.PASS,
    widen.PASS,
    precondition.PASS,
    Pass("resolve", _resolve, reads=("trainables", "preconditioned"), adds=("spec",)),
    lift.PASS,
    Pass("eval graph", _eval_graph, reads=("io", "trainables", "state"), adds=("eval_model",)),
    prng.PASS,
    momentum.PASS,        # --momentum / --sharpness (else nothing)
    _by_estimator(pair.PASS, {"node": node.PAIR, "head": head.PAIR}),
    loss.PASS,
    _by_estimator(estimate.PASS, {"node": node.ESTIMATE, "head": head.ESTIMATE}),
    momentum.UPDATE,      # the buffer's next value, from the raw ĝ
    kernelnorm.PASS,      # --kernel-norm (else nothing)
    sparsify.PASS,        # --sparsity (else nothing)
    update.PASS,
    integer_products.PASS,   # node/head: the trained products on int8 planes
    exact_forward.PASS,   # --forward exact (else nothing)
    Pass("contract", _contract, reads=("io", "plan", "trainables", "perturbations", "branches", "estimate", "update",
                                       "preconditioned", "buffers"), adds=("contract",)),
    finalize.PASS,
]


def run_passes(passes: list[Pass], graph, ctx: Context):
    """Run `passes` in order, checking each one's declared reads and adds around it."""
    done: list[str] = []
    for p in passes:
        missing = [f for f in p.reads if getattr(ctx, f) is None]
        if missing:
            raise CompileError(f"internal: pass {p.name!r} reads {', '.join(missing)}, which no pass before it "
                               f"({_names(done)}) set. Please report it with the model.")
        try:
            graph = p.run(graph, ctx)
        except FgcompileError:
            raise
        except Exception as exc:
            raise CompileError(f"internal error in pass {p.name!r} (after {_names(done)}): "
                               f"{type(exc).__name__}: {exc}. Please report it with the model.") from exc
        unset = [f for f in p.adds if getattr(ctx, f) is None]
        broken = _dangling(graph) if isinstance(graph, gs.Graph) else None
        if unset or broken or not isinstance(graph, (gs.Graph, onnx.ModelProto)):
            what = f"did not set {', '.join(unset)}" if unset else f"left {broken} without a producer" if broken \
                else f"returned {type(graph).__name__}, not a graph"
            raise CompileError(f"internal error in pass {p.name!r} (after {_names(done)}): it {what}. Please "
                               "report it with the model.")
        done.append(p.name)
    return graph


def _names(done: list[str]) -> str:
    return ", ".join(done) or "none"


def _dangling(graph: gs.Graph) -> str | None:
    """The first tensor a node reads that is neither produced by a node of the graph, a graph input,
    nor a constant."""
    inputs, nodes = {id(t) for t in graph.inputs}, {id(n) for n in graph.nodes}
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Variable) and t.name and id(t) not in inputs and \
                    not any(id(p) in nodes for p in t.inputs):
                return f"{t.name!r} (read by {node.name!r})"
    return None


def compile_graph(model: onnx.ModelProto, spec: TrainSpec, calibration=None, passes=None) -> Compiled:
    """`calibration`: float32 inputs [N, ...] (no labels) for preconditioning; frozen at compile time.
    `passes`: PASSES unless given (a test injects a broken one)."""
    if spec.precondition == "whiten" and calibration is None:
        raise CompileError("--precondition whiten needs calibration inputs: pass --calibration DATA.npz "
                           "(e.g. the training data), or --precondition none.")
    use = None if spec.precondition == "none" or calibration is None else np.asarray(calibration, np.float32)
    ctx = Context(spec, model, calibration=use)
    run_passes(PASSES if passes is None else passes, model, ctx)
    return Compiled(ctx.train_model, ctx.eval_model, ctx.state.initial, ctx.contract, ctx.source, ctx.notes)
