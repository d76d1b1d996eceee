"""fleet: `fgcompile fleet`, a fleet of simulated devices adapting one model, to decide before it ships
whether on-device adaptation is safe and what it costs.

MODEL is compiled once into OUT/compiled (the devices' pooled training data whitens, as adapt does); the
rate is chosen by 5-fold cross-validation on the pooled training data at the run's epochs (or given with
--lr). Then, with one schedule (rounds × local epochs, batch, rate, seed), each mode asked for:
    alone        each device trains on its own shard for the rounds' epochs and keeps its model
    federated    every round each device trains from the global model and uploads its signs (weight
                 perturbation) or its integer update; the server applies them (runtime/fleet.py), here
                 (--backend local) or on Flower's simulation engine (--backend flower, runtime/flower.py)
    centralized  the pooled training data, the same epochs and rate: the reference for federated
Reported per device: accuracy on its own test data before and after each mode, accuracy on --source
(what is kept), and the bytes uploaded per round. OUT/fleet.json holds the report, OUT/federated.onnx the
federated model (a plain QDQ model, as export writes it).

The fleet data file: x, y as a data file, plus device (int, one id per example, 0..N-1) and split
(0 train, 1 test); optional shift [N, K] and shift_names [K] describe each device's shift.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import statistics

import numpy as np

from fgcompile import cluster, heads, modelio
from fgcompile.adapt import check_out, make_out
from fgcompile.compiler import compile_model, write_compiled
from fgcompile.errors import DataError, SpecError
from fgcompile.npzfile import read_npz
from fgcompile.report import format_table
from fgcompile.runtime import fleet as sim
from fgcompile.runtime.data import decode_x, replayed
from fgcompile.runtime.evaluate import read_as
from fgcompile.runtime.export import export_state, matrices, save_exported
from fgcompile.runtime.program import Program, open_train_graph, session_of
from fgcompile.runtime.trainer import Trainer
from fgcompile.runtime.tune import tune
from fgcompile.session import SessionSettings
from fgcompile.spec import TrainSpec

MODES = ("alone", "federated", "centralized")
UPLOADS = ("auto", "signs", "update")
BACKENDS = ("local", "flower")
FEDERATED, REPORT = "federated.onnx", "fleet.json"




def read_fleet(path, sess, head: str) -> tuple[list[sim.Device], list[dict]]:
    """(the devices of a fleet data file, checked against the model session `sess`; each device's shift as
    {name: value}, empty when the file has none)."""
    fix = ("Save it with numpy.savez(path, x=..., y=..., device=..., split=...): one device id (0..N-1) and one "
           "split (0 train, 1 test) per example.")
    arrays = read_npz(path, ["x", "y", "device", "split"], "fleet data file (.npz with x, y, device, split)", fix,
                      optional=("x_scale", "x_offset", "shift", "shift_names"))
    x, y = read_as(sess, (decode_x(path, arrays), arrays["y"]), str(path), head)
    device, split = arrays["device"], arrays["split"]
    for name, a in (("device", device), ("split", split)):
        if not np.issubdtype(a.dtype, np.integer) or a.shape != y.shape[:1]:
            raise DataError(f"{path}: {name} must be integers, one per example ({len(y)}); found {a.dtype} "
                            f"{list(a.shape)}. {fix}")
    if len(y) == 0:
        raise DataError(f"{path}: holds no examples. {fix}")
    if not np.isin(split, (0, 1)).all():
        raise DataError(f"{path}: split holds {sorted(set(split.tolist()) - {0, 1})[:3]}; 0 marks a training example, "
                        f"1 a test one. {fix}")
    ids = np.unique(device)
    if ids[0] < 0 or not np.array_equal(ids, np.arange(len(ids))):
        raise DataError(f"{path}: device ids must be 0..N-1 with none missing; found {len(ids)} ids from {ids[0]} to "
                        f"{ids[-1]}. {fix}")
    devices = []
    for d in ids:
        train, test = (device == d) & (split == 0), (device == d) & (split == 1)
        if not train.any() or not test.any():
            raise DataError(f"{path}: device {d} has {int(train.sum())} training and {int(test.sum())} test "
                            f"examples; every device needs both. {fix}")
        devices.append(sim.Device(int(d), (x[train], y[train]), (x[test], y[test])))
    return devices, _shifts(path, arrays, len(ids))


def _shifts(path, arrays: dict, n: int) -> list[dict]:
    shift, names = arrays.get("shift"), arrays.get("shift_names")
    if shift is None or names is None:
        return [{} for _ in range(n)]
    if shift.ndim != 2 or shift.shape != (n, len(names)) or names.dtype.kind != "U":
        raise DataError(f"{path}: shift must be [devices, K] numbers named by shift_names [K] strings; found "
                        f"{list(shift.shape)} and {list(names.shape)} {names.dtype}. Fix or drop both arrays.")
    return [{str(k): float(v) for k, v in zip(names, row)} for row in shift]


def replay_shares(devices: list[sim.Device], replay: tuple | None) -> list[sim.Device]:
    """Each device's training data followed by its share of the source-domain examples: device d of N keeps
    examples d, d + N, d + 2N, … (so the pooled data holds each once); the devices unchanged without replay."""
    if replay is None:
        return devices
    x, y = replay
    return [dataclasses.replace(d, train=replayed(d.train, (x[d.index::len(devices)], y[d.index::len(devices)])))
            for d in devices]


def _check_batch(sess, devices: list[sim.Device], batch: int, data) -> None:
    """A model whose batch axis is fixed trains at that batch only, on devices holding at least that many."""
    fixed = sess.get_inputs()[0].shape[0]
    if not isinstance(fixed, int):
        return
    if batch != fixed:
        raise SpecError(f"--batch {batch}: the model's batch dimension is fixed at {fixed}. Pass --batch {fixed}, or "
                        "re-export the model with a dynamic batch axis.")
    short = [d.index for d in devices if len(d.train[1]) < fixed]
    if short:
        raise DataError(f"{data}: device {short[0]} holds fewer training examples than the model's fixed batch of "
                        f"{fixed}. Give every device at least {fixed}, or re-export the model with a dynamic batch axis.")


def check_options(rounds, local_epochs, batch, modes, upload, backend, address) -> tuple:
    for flag, value in (("--rounds", rounds), ("--local-epochs", local_epochs), ("--batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SpecError(f"{flag} {value!r}: takes a whole number of at least 1.")
    modes = tuple(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise SpecError(f"--modes {','.join(modes)!r}: choose one or more of {', '.join(MODES)}, comma-separated.")
    if upload not in UPLOADS:
        raise SpecError(f"--upload {upload!r}: choose {', '.join(UPLOADS)}.")
    if backend not in BACKENDS:
        raise SpecError(f"--backend {backend!r}: choose {' or '.join(BACKENDS)}.")
    if address is not None and backend != "flower":
        raise SpecError(f"--address {address}: only --backend flower runs on a Ray cluster. Add --backend flower, or "
                        "leave out --address.")
    if backend == "flower":
        from fgcompile.runtime.flower import import_flower
        import_flower()   # a missing extra, or an address that does not answer, is said before anything is read
        cluster.checked_address(address)
    return tuple(m for m in MODES if m in modes)


def run_fleet(model, data, out=None, rounds: int = 20, local_epochs: int = 1, batch: int = 8, lr: int | None = None,
              modes=MODES, upload: str = "auto", backend: str = "local", address: str | None = None, source=None,
              replay=None, spec: TrainSpec | None = None, force: bool = False, echo=print, show=None) -> dict:
    """Simulate the fleet of DATA (a fleet data file) adapting MODEL into OUT (see the module). lr: the peak
    lr numerator (default: the compiled one when spec.lr is set, else chosen by tune on the pooled training
    data). replay: source-domain training examples, dealt out to the devices (replay_shares). Returns the
    report."""
    spec, show = spec or TrainSpec(), show or echo
    modes = check_options(rounds, local_epochs, batch, modes, upload, backend, address)
    out = pathlib.Path(out if out is not None else f"{pathlib.Path(model).stem}-fleet")
    check_out(out, model, "fleet", force, files=(FEDERATED, REPORT), inputs=[data] + [p for p in (source, replay) if p])
    source_model = modelio.load_model(model)
    sess, head = session_of(source_model, model), heads.head_of(source_model).kind
    devices, shifts = read_fleet(data, sess, head)
    source_train = None if replay is None else read_as(sess, replay, "--replay", head)
    devices = replay_shares(devices, source_train)
    source_test = None if source is None else read_as(sess, source, "--source", head)
    _check_batch(sess, devices, batch, data)
    pooled = sim.pooled(devices)
    compiled = compile_model(source_model, spec, calibration=pooled[0])
    if spec.estimator == "auto" and upload != "update" and compiled.contract.spec.estimator == "head":
        # a device's signs replay on the server (m bits a step) only from weight perturbation: where auto
        # trained the output layer with its exact gradient (an update upload), the fleet keeps Sign-m-SPSA
        spec = dataclasses.replace(spec, estimator="sign")
        compiled = compile_model(source_model, spec, calibration=pooled[0])
    kind = sim.upload_kind(compiled.contract, upload) if "federated" in modes else None
    top = compiled.contract.lr_numerator.max
    if lr is None and spec.lr is not None:
        lr = compiled.contract.lr_numerator.default
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int) or not 1 <= lr <= top):
        raise SpecError(f"run_fleet(lr={lr!r}): the lr numerator of this graph must be a whole number in [1, {top}] "
                        f"(the step is lr / 2^{compiled.contract.lr_numerator.shift}); leave it out to let tune choose.")
    make_out(out, "fleet")
    write_compiled(compiled, out / "compiled", force, source_path=model, own_training=True)
    echo(f"compiled: {out / 'compiled'} ({len(devices)} devices, {len(pooled[1])} training examples in all)")
    if lr is None:
        record = tune(Trainer(out / "compiled"), pooled, epochs=rounds * local_epochs, batch=batch,
                      echo=lambda s: echo(f"  {s}"))
        lr = record["choice"]["lr_numerator"]
        echo(f"tune: lr numerator {lr} (5-fold cross-validation on the pooled training data)")
    schedule = sim.Schedule(rounds, local_epochs, batch, lr, compiled.contract.spec.seed)
    # absolute: a Flower worker on a running Ray cluster has its own working folder
    setup = functools.partial(_setup, *(str(pathlib.Path(p).resolve()) for p in (out / "compiled", data, model)), schedule,
                              None if replay is None else str(pathlib.Path(replay).resolve()))
    program, server = _program_and_server(str(out / "compiled"), schedule)
    models, history = _simulate(program, server, setup, devices, modes, schedule, kind, backend, address, echo)
    report = _report(program, devices, shifts, models, source_test, history, schedule, kind, backend)
    report["replayed"] = 0 if source_train is None else len(source_train[1])
    if "federated" in modes:
        contract = compiled.contract
        exported, _ = export_state(compiled.source, contract, models["federated"], matrices(compiled.train, contract))
        save_exported(exported, out / FEDERATED)
        report["federated_model"] = str(out / FEDERATED)
    modelio.save_json(out / REPORT, report)
    for line in format_report(report):
        show(line)
    show(f"\nreport: {out / REPORT}" + (f"\nfederated model: {out / FEDERATED}" if "federated" in modes else ""))
    return report


def _simulate(program, server, setup, devices, modes, schedule, kind, backend, address, echo) -> tuple[dict, list]:
    """({mode: the tensors, per device for alone}, the federated rounds' uploads or None)."""
    models, history, epochs = {"before": dict(program.initial)}, None, schedule.rounds * schedule.local_epochs
    if "alone" in modes:
        echo(f"alone: {len(devices)} devices, {epochs} epochs each on their own data")
        models["alone"] = sim.alone(program, devices, schedule)
    if "federated" in modes:
        echo(f"federated: {schedule.rounds} rounds of {schedule.local_epochs} local epoch(s), {kind} uploads, "
             f"backend {backend}")
        if backend == "flower":
            from fgcompile.runtime import flower
            models["federated"], history = flower.federated(setup, schedule, kind, len(devices), address, echo)
        else:
            models["federated"], history = sim.federated(program, server, devices, schedule, kind, echo=echo)
    if "centralized" in modes:
        echo(f"centralized: {epochs} epochs on the pooled training data")
        models["centralized"] = sim.centralized(program, devices, schedule)
    return models, history


def _setup(compiled: str, data: str, model: str, schedule: sim.Schedule, replay: str | None = None):
    """(program, server, devices) from the driver's files, for Flower's server and each of its worker processes."""
    source_model = modelio.load_model(model)
    sess, head = session_of(source_model, model), heads.head_of(source_model).kind
    devices, _ = read_fleet(data, sess, head)
    devices = replay_shares(devices, None if replay is None else read_as(sess, replay, "--replay", head))
    return (*_program_and_server(compiled, schedule), devices)


def _program_and_server(compiled: str, schedule: sim.Schedule):
    """The compiled folder's Program (its train session also outputs the coefficients) and the Server."""
    train, contract, _ = open_train_graph(pathlib.Path(compiled))
    probes = (contract.probes.coefficients,) if contract.probes else ()
    program = Program.of_folder(pathlib.Path(compiled), SessionSettings(), recover=False, probes=probes)
    return program, sim.Server(program.contract, train, schedule)


def _report(program: Program, devices: list, shifts: list, models: dict, source_test, history, schedule, kind,
            backend: str) -> dict:
    """Accuracy per device and mode on its test data (and on the source test data), their spread, the uploads."""
    rows = []
    for d, shift in zip(devices, shifts):
        row = {"device": d.index, "shift": shift, "train": len(d.train[1]), "test": len(d.test[1])}
        for mode, m in models.items():
            row[mode] = program.evaluate(m[d.index] if mode == "alone" else m, *d.test)["accuracy"]
        rows.append(row)
    report = {"devices": rows, "modes": list(models), "summary": {mode: _spread([r[mode] for r in rows]) for mode in models},
              "schedule": {"rounds": schedule.rounds, "local_epochs": schedule.local_epochs, "batch": schedule.batch,
                           "lr_numerator": schedule.lr_numerator, "schedule": schedule.schedule, "seed": schedule.seed},
              "backend": backend}
    if source_test is not None:
        report["source"] = {mode: _spread([program.evaluate(t, *source_test)["accuracy"] for t in m]) if mode == "alone"
                            else program.evaluate(m, *source_test)["accuracy"] for mode, m in models.items()}
    if history is not None:
        uploads = [u for r in history for u in r]
        steps = sum(u.steps for u in uploads)
        weights = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in program.contract.parameters())
        report["upload"] = {"kind": kind, "m": program.contract.spec.m,
                            "bytes_per_round": statistics.fmean(u.nbytes for u in uploads),
                            "bits_per_step": 8 * sum(u.nbytes for u in uploads) / max(steps, 1),
                            "steps_per_round": statistics.fmean(u.steps for u in uploads),
                            "update_bytes_per_round": statistics.fmean(u.update_bytes for u in uploads),
                            "weights_bytes": weights}
    return report


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.pstdev(values)}


def format_report(report: dict) -> list[str]:
    """The per-device table, the spread per mode, what is kept on --source, and the bytes uploaded."""
    modes = report["modes"]
    names = list(report["devices"][0]["shift"])
    rows = [(r["device"], *(f"{r['shift'][n]:.3g}" for n in names), *(f"{r[m]:.1%}" for m in modes))
            for r in report["devices"]]
    for stat in ("mean", "min", "max"):
        rows.append((stat, *("" for _ in names), *(f"{report['summary'][m][stat]:.1%}" for m in modes)))
    right = range(1, 1 + len(names) + len(modes))
    lines = ["", "accuracy on each device's own test data:"]
    lines += format_table(("device", *names, *modes), rows, right=tuple(right))
    if "source" in report:
        kept = [f"{m} {v['mean']:.1%} (mean of the devices)" if isinstance(v, dict) else f"{m} {v:.1%}"
                for m, v in report["source"].items()]
        lines.append("source test accuracy: " + ", ".join(kept))
    if "upload" in report:
        u = report["upload"]
        lines.append(f"uploaded per device per round: {u['bytes_per_round']:.0f} bytes of {u['kind']} "
                     f"({u['bits_per_step']:.1f} bits per step, m = {u['m']}); as an integer update "
                     f"{u['update_bytes_per_round']:.0f} bytes; as weights {u['weights_bytes']} bytes")
    return lines
