"""conformance: the same chained training steps on every installed runtime, compared bit for bit.

What fgcompile guarantees on any runtime that implements ONNX's integer ops exactly (int32 wraparound;
Div of a power-of-two multiple by that power): z, ĝ and the update given the coefficients cᵢ. That
part of the graph ("integer part": from the cᵢ, seed, step, lr and state to the next state) must agree
bit for bit everywhere. The cᵢ = sign(L⁺ᵢ − L⁻ᵢ) come from the model's float forward, so the full step
agrees only where the forward's rounding does (the requantizations of activations, the accumulation
order of float ops). When a full step differs, `first_divergence` names the first op whose output
differs from the baseline (onnxruntime with graph optimizations off, which runs the ONNX ops as written).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import tempfile
from typing import Callable

import numpy as np
import onnx

from fgcompile.artifact import Contract
from fgcompile.report import format_table
from fgcompile.modelio import with_outputs
from fgcompile.session import OPTIMIZATION, SessionSettings, make_session
from fgcompile.spec import READS_ACTIVATIONS
from .program import scores_arithmetic
from .replay import replay_graph
from .step import scalar_feeds, step_feeds

# verify runs every step on each installed runtime and holds each step's z and state (baseline and the runtime
# compared) in memory, so its time and memory grow with the steps. A divergence shows within the first few
# (default 20); 1000 take about a minute on digits_cnn (0.05 s a step).
MAX_STEPS = 1000

Runner = Callable[[list[str], dict], list[np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Runtime:
    """supported: the README calls it supported, so verify exits nonzero when it differs; else its row is
    informational and `note` says why (e.g. "bf16": it runs float ops at a lower precision)."""
    name: str
    config: str
    make: Callable[[onnx.ModelProto], Runner]
    settings: SessionSettings | None = None     # onnxruntime's
    supported: bool = True
    note: str = ""


def _ort(level: str, threads: int = 0) -> Runtime:
    """onnxruntime at optimization `level` (named as onnxruntime names it, e.g. ORT_DISABLE_ALL) with
    `threads` intra-op threads (0: onnxruntime's default)."""
    settings = SessionSettings(optimization=next(k for k, v in OPTIMIZATION.items() if v == level), threads=threads)

    def make(model):
        sess = make_session(model, settings=settings)
        return lambda outputs, feeds: sess.run(outputs, feeds)
    config = level + (f", {threads} thread{'s' if threads > 1 else ''}" if threads else "")
    return Runtime("onnxruntime", config, make, settings)


def _scoring(runtime: Runtime, contract: Contract) -> Runtime:
    """The runtime as eval runs on it: onnxruntime's level capped where eval scores the model's own arithmetic
    (runtime/program.py, scores_arithmetic)."""
    if runtime.settings is None or not scores_arithmetic(contract):
        return runtime

    def make(model):
        sess = make_session(model, settings=runtime.settings, arithmetic=True)
        return lambda outputs, feeds: sess.run(outputs, feeds)
    return dataclasses.replace(runtime, make=make)


def _reference(model) -> Runner:
    from onnx.reference import ReferenceEvaluator
    evaluator = ReferenceEvaluator(model)
    return lambda outputs, feeds: evaluator.run(outputs, feeds)


def _openvino(precision: str | None) -> Callable[[onnx.ModelProto], Runner]:
    """OpenVINO's CPU plugin at `precision` (None: its default, bf16 or f16 where the CPU has them)."""
    def make(model):
        import openvino as ov
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
        compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU", config)
        # OpenVINO drops a graph input no node reads (the head estimator's seed and step) and refuses its feed
        inputs = {name for port in compiled.inputs for name in port.get_names()}

        def run(outputs, feeds):
            result = compiled({k: v for k, v in feeds.items() if k in inputs})
            return [np.asarray(result[compiled.output(name)]) for name in outputs]
        return run
    return make


def _openvino_default_precision() -> str:
    import openvino as ov
    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


def _data_inputs(model: onnx.ModelProto) -> list[str]:
    """The graph inputs a runner feeds, in order (those that are not also initializers)."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _tract(model) -> Runner:
    """tract (the `tract` package), its symbolic batch axis left as the model declares it."""
    import tract
    names = _data_inputs(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save(model, path)
        typed = tract.onnx().load(path).into_model()
    produced = [o.name for o in model.graph.output]    # tract names outputs by their node; the order is the graph's
    runnable = typed.into_runnable()

    def run(outputs, feeds):
        by_name = dict(zip(produced, runnable.run([np.asarray(feeds[n]) for n in names])))
        return [by_name[name].to_numpy() for name in outputs]
    return run


def _tvm(model) -> Runner:
    """TVM's Relax ONNX frontend, built for the host CPU (llvm)."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx
    mod = from_onnx(model, keep_params_in_input=False)
    vm = relax.VirtualMachine(relax.build(mod, target="llvm"), tvm.cpu())
    names = _data_inputs(model)
    produced = [o.name for o in model.graph.output]

    def run(outputs, feeds):
        result = vm["main"](*[tvm.nd.array(np.asarray(feeds[n])) for n in names])
        result = [result] if len(produced) == 1 else list(result)
        by_name = {n: r.numpy() for n, r in zip(produced, result)}
        return [by_name[name] for name in outputs]
    return run


BASELINE = _ort("ORT_DISABLE_ALL")
THREADS = (1, 2)
# the runtimes verify looks for beyond onnxruntime and the ONNX reference: (name, module to import)
OPTIONAL = (("openvino", "openvino"), ("tract", "tract"), ("tvm", "tvm"))


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def installed() -> list[Runtime]:
    """Every runtime configuration available here, the baseline first: onnxruntime at every optimization
    level with 1 and 2 intra-op threads, the ONNX reference evaluator, OpenVINO at f32 and at its default
    precision, tract and TVM. OpenVINO's default precision, tract and TVM are informational."""
    found = [BASELINE] + [_ort(level, t) for level in OPTIMIZATION.values() for t in THREADS]
    found.append(Runtime("onnx.reference", "ReferenceEvaluator", _reference))
    if _importable("openvino"):
        found.append(Runtime("openvino", "CPU f32", _openvino("f32")))
        precision = _openvino_default_precision()
        found.append(Runtime("openvino", f"CPU default ({precision})", _openvino(None), supported=False,
                             note=precision))
    if _importable("tract"):
        found.append(Runtime("tract", "CPU", _tract, supported=False, note="not in the README's supported list"))
    if _importable("tvm"):
        found.append(Runtime("tvm", "llvm", _tvm, supported=False, note="not in the README's supported list"))
    return found


def missing() -> list[str]:
    """The optional runtimes verify checks for that are not installed here."""
    return [name for name, module in OPTIONAL if not _importable(module)]


@dataclasses.dataclass
class StepRecord:
    z: list[np.ndarray]
    coefficients: np.ndarray
    state: dict[str, np.ndarray]
    losses: np.ndarray


def chain(train: onnx.ModelProto, contract: Contract, state: dict, batches: list, runtime: Runtime,
          seed: int = 0, lrs: list[int] | None = None) -> list[StepRecord]:
    """len(batches) chained steps on `runtime`: each step's state is the previous step's output there.
    lrs: step k's lr numerator (default: the compiled rate at every step)."""
    probes, outputs = contract.probes, contract.outputs
    model = with_outputs(train, probes.z + [probes.coefficients])
    run = runtime.make(model)
    names = probes.z + [probes.coefficients, outputs.loss_plus, outputs.loss_minus] + [s.output for s in contract.state]
    records = []
    for k, (x, y) in enumerate(batches):
        out = run(names, step_feeds(contract, x, y, seed, k, _lr(contract, lrs, k), state))
        zs, (c, lp, lm), new = out[:len(probes.z)], out[len(probes.z):len(probes.z) + 3], out[len(probes.z) + 3:]
        state = {s.name: v for s, v in zip(contract.state, new)}
        records.append(StepRecord(zs, c, state, np.stack([lp, lm])))
    return records


def _lr(contract: Contract, lrs: list[int] | None, k: int) -> int:
    return contract.lr_numerator.default if lrs is None else lrs[k]


def integer_part(train: onnx.ModelProto, contract: Contract) -> onnx.ModelProto:
    """The graph from (cᵢ, seed, step, lr, state) to (next state, z): what fgcompile guarantees (the replay
    graph, runtime/replay.py, with the zᵢ as outputs too)."""
    return replay_graph(train, contract, extra=tuple(contract.probes.z))


def chain_integer_part(part: onnx.ModelProto, contract: Contract, state: dict, coefficients: list[np.ndarray],
                       runtime: Runtime, seed: int = 0, lrs: list[int] | None = None) -> list[StepRecord]:
    """Chained steps of the integer part with the given cᵢ per step."""
    run = runtime.make(part)
    names = [s.output for s in contract.state] + contract.probes.z
    records = []
    for k, c in enumerate(coefficients):
        feeds = {contract.probes.coefficients: np.asarray(c, np.int32), **state, **scalar_feeds(contract, seed, k, _lr(contract, lrs, k))}
        out = run(names, feeds)
        state = {s.name: v for s, v in zip(contract.state, out)}
        records.append(StepRecord(out[len(state):], np.asarray(c), state, np.zeros(0)))
    return records


def first_difference(base: list[StepRecord], other: list[StepRecord]) -> tuple[int, str] | None:
    """(step, what) of the first step whose z, coefficients or state differ, else None."""
    for k, (a, b) in enumerate(zip(base, other)):
        if not all(np.array_equal(p, q) for p, q in zip(a.z, b.z)):
            return k, "z"
        if not np.array_equal(a.coefficients, b.coefficients):
            return k, "coefficients"
        if not all(np.array_equal(a.state[n], b.state[n]) for n in a.state):
            return k, "state"
    return None


def first_divergence(model: onnx.ModelProto, feeds: dict, runtime: Runtime) -> str:
    """The first op (in graph order) whose output on `runtime` differs from the baseline's, and the first
    whose output is integer (a requantization that rounded differently: float ops that only reorder a
    sum differ by ULPs everywhere, an integer step is what moves the losses), as text. onnxruntime with
    optimizations runs its own optimized graph: that graph's nodes are compared (run unoptimized), so a
    fused node (QLinearSoftmax, QGemm, …) can be named."""
    graph_model = _ort_optimized(model, runtime.settings) if runtime.settings is not None else model
    names = [o for node in graph_model.graph.node for o in node.output if o]
    base_values = _values(model, feeds, BASELINE, names)
    runner = BASELINE if runtime.settings is not None else runtime
    values = _values(graph_model, feeds, runner, [n for n in names if n in base_values])
    found = []
    for node in graph_model.graph.node:
        for name in node.output:
            if name in values and name in base_values and not _same(values[name], base_values[name]):
                integer = np.asarray(values[name]).dtype.kind in "iub"
                if not found or (integer and not any(f[0] for f in found)):
                    found.append((integer, _describe(node, name, values[name], base_values[name])))
        if any(f[0] for f in found):
            break
    if not found:
        return "no intermediate differs when exposed (exposing outputs changed how the runtime fused the graph)"
    text = found[0][1]
    if len(found) > 1:
        text += f"; first integer difference: {found[1][1]}"
    elif not found[0][0]:
        text += "; no integer tensor differs"
    return text


def _describe(node, name: str, value, base_value) -> str:
    a, b = np.asarray(value), np.asarray(base_value)
    if a.shape == b.shape:
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        detail = f"max |Δ| {np.nanmax(diff):.3g} on {int((diff != 0).sum())} of {diff.size} values"
    else:
        detail = f"shape {a.shape} vs {b.shape}"
    domain = f"{node.domain}." if node.domain else ""
    return f"{domain}{node.op_type} '{node.name}' → '{name}': {detail}"


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def _values(model, feeds, runtime: Runtime, names: list[str]) -> dict:
    probed = with_outputs(model, names)
    available = [o.name for o in probed.graph.output if o.name in set(names)]
    return dict(zip(available, runtime.make(probed)(available, feeds)))


def _ort_optimized(model: onnx.ModelProto, settings: SessionSettings) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        make_session(model, settings=settings, optimized_path=path)
        return onnx.load(path)


def trainer_batches(trainer, data, steps: int, epochs: int, batch: int | None, schedule: str | None = None,
                    lr: float | None = None) -> tuple[list, list[int], str | None]:
    """(batches, lr numerators, a note) of the trainer's steps 0..steps-1 on `data` (None: seeded synthetic
    examples): the plan, permutation and rate that `fgcompile train OUT --data DATA --epochs E --batch B`
    takes (runtime/loop.py's plan and batch_order, runtime/rate.py's choose: OUT/tune.json's choice is
    honoured as train honours it). batch None: the model's fixed batch, else RunDefaults.batch."""
    from fgcompile.errors import SpecError
    from fgcompile.session import class_count, input_dtype, input_shape
    from fgcompile.spec import RunDefaults
    from . import loop, rate
    from .data import Inputs

    program = trainer.program
    batch = batch if batch is not None else (program.fixed_batch or RunDefaults.batch)
    peak, schedule, note = rate.choose(trainer.contract, lr, schedule, epochs, trainer.out, trainer.train_sha256)
    if data is not None:
        x, y = trainer.load_data(data)
    else:   # enough examples that the plan covers the steps
        names, sess = trainer.contract.data_inputs, program.eval
        n = batch * max(4, -(-steps // epochs))
        arrays = {name: _synthetic(input_shape(sess, name), class_count(sess), batch, input_dtype(sess, name),
                                   trainer.contract.head, n) for name in names}
        x, y = arrays[names[0]] if len(names) == 1 else (Inputs({k: a[0] for k, a in arrays.items()}),
                                                          arrays[names[0]][1])
    plan = loop.plan(program, data, len(y), epochs, batch, schedule, peak)
    if steps > plan.total:
        raise SpecError(f"--steps {steps}: the run trains only {plan.total} steps ({epochs} epochs of "
                        f"{plan.per_epoch} batches of {plan.batch}). Pass --steps {plan.total} or fewer, or more --epochs.")
    order = [idx for _, _, _, idx in itertools.islice(loop.batch_order(program.spec.seed, plan, 0), steps)]
    return [(x[idx], y[idx]) for idx in order], [plan.lr_at(k) for k in range(steps)], note


def verify(out_dir, steps: int = 20, data=None, batch: int | None = None, epochs: int | None = None,
           schedule: str | None = None, lr: float | None = None, runtimes: list[Runtime] | None = None) -> list[dict]:
    """Run the trainer's steps 0..steps-1 of the compiled folder (from its initial state, with the batches,
    seed and lr numerators `fgcompile train` feeds: trainer_batches) on every installed runtime; one row each:
    runtime, config, identical (z, coefficients and state of every step), integer_part (the same with
    the baseline's cᵢ fed in; None for node perturbation and the head estimator, whose steps also read the trained layers' inputs), eval (eval.onnx outputs on the first batch), first_divergence."""
    import pathlib

    from fgcompile import modelio
    from fgcompile.artifact import LAYOUT
    from fgcompile.errors import FgcompileError, SpecError
    from fgcompile.spec import RunDefaults
    from .data import feeds
    from .trainer import Trainer

    if not 1 <= steps <= MAX_STEPS:
        raise SpecError(f"--steps {steps}: must be 1..{MAX_STEPS} (each step's state is kept to compare).")
    out = pathlib.Path(out_dir)
    trainer = Trainer(out)                          # the same checks and messages as `train`
    train, eval_model = modelio.load_model(out / LAYOUT.train), modelio.load_model(out / LAYOUT.eval)
    contract = trainer.contract
    if contract.probes is None:
        raise FgcompileError(f"{out}: compiled by an fgcompile without conformance probes. Compile it again.")
    state, seed = trainer.initial_state, trainer.spec.seed
    batches, lrs, _ = trainer_batches(trainer, data, steps, epochs or RunDefaults.epochs, batch, schedule, lr)
    base = chain(train, contract, state, batches, BASELINE, seed, lrs)
    # node perturbation's and the head's step also read the trained layers' inputs: no graph from the cᵢ alone
    part = integer_part(train, contract) if contract.spec.estimator not in READS_ACTIVATIONS else None
    coefficients = [r.coefficients for r in base]
    base_part = None if part is None else chain_integer_part(part, contract, state, coefficients, BASELINE, seed, lrs)
    params = {s.name for s in contract.parameters()}   # eval.onnx takes no training buffers
    eval_feeds = {**feeds(contract.inputs.data, batches[0][0]), **{k: v for k, v in state.items() if k in params}}
    eval_out = [eval_model.graph.output[0].name]
    base_eval = _scoring(BASELINE, contract).make(eval_model)(eval_out, eval_feeds)[0]
    rows = []
    for runtime in installed() if runtimes is None else runtimes:
        row = {"runtime": runtime.name, "config": runtime.config, "supported": runtime.supported}
        try:
            got = chain(train, contract, state, batches, runtime, seed, lrs)
            diff = first_difference(base, got)
            row["identical"] = diff is None
            row["integer_part"] = None if part is None else first_difference(
                base_part, chain_integer_part(part, contract, state, coefficients, runtime, seed, lrs)) is None
            row["eval"] = _same(_scoring(runtime, contract).make(eval_model)(eval_out, eval_feeds)[0], base_eval)
            if diff is not None:
                k, what = diff
                step_in = step_feeds(contract, *batches[k], seed, k, lrs[k], state if k == 0 else base[k - 1].state)
                row["first_divergence"] = f"step {k}, {what}: {first_divergence(train, step_in, runtime)}"
            same = row["identical"] and row["integer_part"] is not False
            row["result"] = "identical" if same else "DIFFERS" if runtime.supported else \
                f"differs (informational: {runtime.note})"
        except Exception as exc:            # a runtime that cannot run the graph is a result, not a crash
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            row.update(identical=False, integer_part=False, eval=False,
                       result="CANNOT RUN" if runtime.supported else "cannot run (informational)",
                       first_divergence=f"{runtime.name}: cannot run: {type(exc).__name__}: {reason}")
        logging.getLogger("fgcompile.verify").info("%s %s: %s", runtime.name, runtime.config, row)
        rows.append(row)
    if runtimes is None:
        rows += [{"runtime": name, "config": "-", "supported": False, "identical": None, "integer_part": None,
                  "eval": None, "result": "not installed (informational)"} for name in missing()]
    return rows


def failing(rows: list[dict]) -> list[dict]:
    """The rows that make `verify` exit nonzero: a supported runtime that differs or cannot run the graph."""
    return [r for r in rows if r["supported"] and not (r["identical"] and r["integer_part"] is not False)]


def _synthetic(shape: list, classes: int | None, batch: int, dtype=np.float32,
               head: str = "softmax", examples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded uniform [0, 1) inputs of the model's input shape (integer inputs: ids 0 and 1, valid for any
    vocabulary of two or more) and random labels (a Sigmoid head's: 0/1, [n, K] for K > 1), when no data
    is given."""
    rng = np.random.default_rng(0)
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in shape[1:]]
    n = examples or (shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 4 * batch)
    x = rng.integers(0, 2, [n] + dims) if np.issubdtype(np.dtype(dtype), np.integer) else rng.uniform(0, 1, [n] + dims)
    if head == "sigmoid":
        return x.astype(dtype), rng.integers(0, 2, n if classes == 1 else (n, classes or 1)).astype(np.int64)
    return x.astype(dtype), rng.integers(0, classes or 2, n).astype(np.int64)


def format_rows(rows: list[dict]) -> str:
    yes = lambda v: "-" if v is None else "yes" if v else "NO"
    return "\n".join(format_table(("runtime", "config", "result", "integer part", "eval", "first divergence"),
                                  [(r["runtime"], r["config"], r["result"], yes(r["integer_part"]),
                                    yes(r["eval"]), r.get("first_divergence", "-")) for r in rows]))
