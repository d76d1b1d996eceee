"""fleet: a simulated fleet of devices adapting one deployed model: each alone, in federated rounds, or
centrally on their pooled data (the reference the federated rounds are held to).

A round of device d (its own shard, seed seed_d = seed + 1 + d) starts from the global state and takes
its local epochs of steps k = r·S_d … (r+1)·S_d − 1, S_d its steps per round, batches as `train` orders
them (loop.batch_order). What it sends back (its Upload):
    signs   weight perturbation: each step's coefficients cᵢ, one bit each (cᵢ = +1 / −1); the rare
            ties (cᵢ = 0) and bad steps (a NaN/Inf loss) follow as varint gaps. m bits per step.
            The server replays them (runtime/replay.py) and gets the device's update bit for bit, because
            the update is a function of (state, seed_d, k, lr, cᵢ) alone.
    update  any estimator: the integer difference of each trained tensor over the round, in the narrowest
            integer dtype that holds it, zlib-compressed.
The server adds every device's update to the global state in device order: a signs upload is replayed
step by step onto it, an update is summed and saturated to the tensor's grid. Per round the global model
thus takes the steps of all the devices, as training on the pooled data would (centralized), from
estimates each device took on its own data at the round's start.

Everything derives from (seed, d, r), so a round run anywhere (this process, a Ray worker under Flower)
sends the same bytes, and the server's model is the same bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import zlib

import numpy as np

from fgcompile.errors import SpecError
from fgcompile.session import make_session
from . import loop
from .data import replayed
from .program import Program
from .replay import replay_graph, replayable
from .state import TrainState
from .step import scalar_feeds, step



@dataclasses.dataclass(frozen=True)
class Device:
    index: int
    train: tuple        # (x, y) as Program.load_data gives them
    test: tuple


@dataclasses.dataclass(frozen=True)
class Schedule:
    rounds: int
    local_epochs: int
    batch: int
    lr_numerator: int      # the peak
    seed: int
    schedule: str = "cosine"   # over the rounds' steps, as `train` runs it over its epochs

    def device_seed(self, d: int) -> int:
        return (self.seed + 1 + d) % 2 ** 32

    def device_plan(self, device: Device) -> loop.Plan:
        """A device's steps over all the rounds: S_d = local_epochs · (examples // batch) per round."""
        n = len(device.train[1])
        return loop.Plan(min(self.batch, n), self.rounds * self.local_epochs, self.schedule, n, None, self.lr_numerator)

    def lr_at(self, k: int, steps: int) -> int:
        """The rate of step k of a device that takes `steps` per round (its plan's lr_at)."""
        return loop.rate_at(self.schedule, self.lr_numerator, k, self.rounds * steps)


@dataclasses.dataclass(frozen=True)
class Upload:
    device: int
    round: int
    kind: str           # signs | update
    steps: int          # the round's steps: the server replays k = round·steps …
    payload: bytes
    update_bytes: int   # what the same round's integer update would have cost (encode_update), for the report

    @property
    def nbytes(self) -> int:
        return len(self.payload)


def upload_kind(contract, asked: str = "auto") -> str:
    """signs where a step replays from its coefficients, else update; `asked` signs where it cannot: SpecError."""
    why = replayable(contract)
    if asked == "signs" and why:
        raise SpecError(f"--upload signs: {why}.")
    if asked == "auto":
        return "update" if why else "signs"
    return asked


def device_round(program: Program, tensors: dict, device: Device, r: int, schedule: Schedule,
                 kind: str | None) -> tuple[Upload | None, dict]:
    """One device's round from the global `tensors`: (its upload, its new tensors); kind None: no upload (a
    device alone). For a signs upload the program's train session outputs the coefficients
    (Program.of_folder(..., probes=(probes.coefficients,)))."""
    plan = schedule.device_plan(device)
    steps, seed = plan.per_epoch * schedule.local_epochs, schedule.device_seed(device.index)
    state = TrainState(tensors, r * steps)
    own = program.with_seed(seed)
    x, y = device.train
    coefficients, bad = [], []
    for k, _, _, idx in itertools.islice(loop.batch_order(seed, plan, state.step), steps):
        state, metrics = step(own, state, (x[idx], y[idx]), plan.lr_at(k))
        bad.append(metrics is None)
        coefficients.append(np.zeros(program.contract.spec.m, np.int32) if metrics is None
                            else metrics.get("coefficients"))
    if kind is None:
        return None, dict(state.tensors)
    update = encode_update(program.contract, tensors, state.tensors)
    payload = encode_signs(np.stack(coefficients), np.array(bad), program.contract.spec.estimator) \
        if kind == "signs" else update
    return Upload(device.index, r, kind, steps, payload, len(update)), dict(state.tensors)


class Server:
    """The global model's side: applies uploads in device order (replaying signs through the replay graph)."""

    def __init__(self, contract, train_model, schedule: Schedule):
        self.contract, self.schedule = contract, schedule
        self._replay = None
        self._train_model = train_model

    def replay_session(self):
        if self._replay is None:
            self._replay = make_session(replay_graph(self._train_model, self.contract))
        return self._replay

    def apply(self, tensors: dict, uploads: list[Upload]) -> dict:
        """The global tensors after every upload of a round, applied in device order."""
        for u in sorted(uploads, key=lambda u: u.device):
            tensors = self.replayed(tensors, u) if u.kind == "signs" else self.summed(tensors, u)
        return tensors

    def replayed(self, tensors: dict, u: Upload) -> dict:
        c = self.contract
        coefficients, bad = decode_signs(u.payload, u.steps, c.spec.m, c.spec.estimator)
        session, seed, names = self.replay_session(), self.schedule.device_seed(u.device), [s.name for s in c.state]
        for j in range(u.steps):
            if bad[j]:
                continue       # the device kept its state on a bad step
            k = u.round * u.steps + j
            out = session.run(None, {c.probes.coefficients: coefficients[j], **tensors,
                                     **scalar_feeds(c, seed, k, self.schedule.lr_at(k, u.steps))})
            tensors = dict(zip(names, out))
        return tensors

    def summed(self, tensors: dict, u: Upload) -> dict:
        deltas = decode_update(self.contract, u.payload)
        return {s.name: np.clip(tensors[s.name].astype(np.int64) + deltas[s.name], s.qmin, s.qmax).astype(s.dtype)
                for s in self.contract.state}


def encode_signs(coefficients: np.ndarray, bad: np.ndarray, estimator: str) -> bytes:
    """[steps, m] cᵢ → bytes: sign: one bit per cᵢ (1 for +1), then the ties (cᵢ = 0) as gaps between their
    flat indices; spsa: the int8 cᵢ. Then, only if some step failed, a 0 and the failed steps as gaps. Gaps
    are LEB128 varints, so a tie costs a byte while ties are at most 128 coefficients apart."""
    flat = coefficients.reshape(-1)
    if estimator == "sign":
        head, ties = np.packbits(flat > 0).tobytes(), np.flatnonzero(flat == 0)
    else:
        head, ties = flat.astype(np.int8).tobytes(), np.zeros(0, np.int64)
    failed = np.flatnonzero(bad)
    return head + _gaps(ties) + (b"\0" + _gaps(failed) if len(failed) else b"")


def decode_signs(payload: bytes, steps: int, m: int, estimator: str) -> tuple[np.ndarray, np.ndarray]:
    """(int32 [steps, m] cᵢ, bool [steps] bad) of encode_signs' bytes."""
    n = steps * m
    size = (n + 7) // 8 if estimator == "sign" else n
    if estimator == "sign":
        c = np.where(np.unpackbits(np.frombuffer(payload[:size], np.uint8))[:n] > 0, 1, -1).astype(np.int32)
    else:
        c = np.frombuffer(payload[:size], np.int8).astype(np.int32)
    ties, failed = _positions(payload[size:])
    c[ties] = 0
    bad = np.zeros(steps, bool)
    bad[failed] = True
    return c.reshape(steps, m), bad


def _gaps(positions) -> bytes:
    """Increasing positions as LEB128 varints of p₁ + 1, p₂ − p₁, …: every value >= 1, so a 0 byte separates."""
    out, previous = bytearray(), -1
    for p in positions:
        gap, previous = int(p) - previous, int(p)
        while gap >= 0x80:
            out.append(gap & 0x7F | 0x80)
            gap >>= 7
        out.append(gap)
    return bytes(out)


def _positions(raw: bytes) -> tuple[list, list]:
    """(tie positions, failed steps) of the varint gaps after the coefficients."""
    lists, current, previous, value, shift = [], [], -1, 0, 0
    for byte in raw:
        if byte == 0 and shift == 0:      # the separator (a gap is never 0)
            lists.append(current)
            current, previous = [], -1
            continue
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            previous += value
            current.append(previous)
            value, shift = 0, 0
    lists.append(current)
    return lists[0], lists[1] if len(lists) > 1 else []


def encode_update(contract, before: dict, after: dict) -> bytes:
    """The round's integer difference of each trained tensor, in the state's order, each in the narrowest
    of int8/int16/int32 that holds it (one dtype byte first), zlib-compressed."""
    parts = []
    for s in contract.state:
        d = after[s.name].astype(np.int64) - before[s.name].astype(np.int64)
        dtype = next(t for t in (np.int8, np.int16, np.int32) if np.abs(d).max(initial=0) <= np.iinfo(t).max)
        parts.append(bytes([np.dtype(dtype).itemsize]) + d.astype(np.dtype(dtype).newbyteorder("<")).tobytes())
    return zlib.compress(b"".join(parts), 9)


def decode_update(contract, payload: bytes) -> dict:
    raw, deltas, at = zlib.decompress(payload), {}, 0
    for s in contract.state:
        size, n = raw[at], int(np.prod(s.shape))
        dtype = {1: "<i1", 2: "<i2", 4: "<i4"}[size]
        deltas[s.name] = np.frombuffer(raw, dtype, n, at + 1).astype(np.int64).reshape(s.shape)
        at += 1 + size * n
    return deltas


def federated(program: Program, server: Server, devices: list[Device], schedule: Schedule, kind: str,
              run_round=None, echo=None) -> tuple[dict, list[list[Upload]]]:
    """(the global tensors after every round, each round's uploads). run_round(tensors, r) -> uploads runs
    a round's devices (default: one after another here; runtime/flower.py runs them on Flower)."""
    tensors = dict(program.initial)
    run_round = run_round or (lambda t, r: [device_round(program, t, d, r, schedule, kind)[0] for d in devices])
    history = []
    for r in range(schedule.rounds):
        uploads = run_round(tensors, r)
        tensors = server.apply(tensors, uploads)
        history.append(uploads)
        if echo:
            echo(f"round {r + 1}/{schedule.rounds}: {len(uploads)} uploads, "
                 f"{sum(u.nbytes for u in uploads) / len(uploads):.0f} bytes each on average")
    return tensors, history


def alone(program: Program, devices: list[Device], schedule: Schedule) -> list[dict]:
    """Each device's tensors after the same rounds of its own steps, with nobody to share them with."""
    out = []
    for d in devices:
        tensors = dict(program.initial)
        for r in range(schedule.rounds):
            tensors = device_round(program, tensors, d, r, schedule, None)[1]
        out.append(tensors)
    return out


def pooled(devices: list[Device]) -> tuple:
    """(x, y) of every device's training data, in device order (several model inputs too)."""
    return functools.reduce(replayed, [d.train for d in devices])


def centralized(program: Program, devices: list[Device], schedule: Schedule) -> dict:
    """The tensors after training on the devices' pooled training data for the same epochs and rate."""
    x, y = pooled(devices)
    plan = loop.Plan(min(schedule.batch, len(y)), schedule.rounds * schedule.local_epochs, schedule.schedule, len(y),
                     None, schedule.lr_numerator)
    state, _, _ = loop.run(program.with_seed(schedule.seed), TrainState(program.initial), (x, y), plan)
    return dict(state.tensors)
