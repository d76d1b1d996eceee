"""step: one training step as a pure function of (program, state, batch, lr numerator).

    feeds    = batch, (seed, k, lr) as int32 scalars, state.tensors      k = state.step, seed = program.spec.seed
    outputs  = program.train.run(feeds)
    state'   = TrainState(outputs' next state, k + 1, bad_steps)     when the loss is finite
             = TrainState(state.tensors, k + 1, bad_steps + 1)       when it is NaN or Inf (the graph gave c = 0
                                                                       already; the state is kept all the same)
Everything the step uses is in its arguments, so the same arguments give the same result (the graph's
arithmetic is deterministic), and it changes none of them: resume, tune and a replay are the same call.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fgcompile.artifact import Contract
from fgcompile.session import running
from .data import feeds
from .program import Program
from .state import TrainState


def step(program: Program, state: TrainState, batch: tuple, lr_numerator: int) -> tuple[TrainState, dict | None]:
    """(the next state, {loss, accuracy} of the batch, and its coefficients cᵢ where the program's train session
    outputs them: runtime/fleet.py), or (the state with the step counted as bad, None) when the loss is NaN or
    Inf. batch: (x, y) as Program.load_data gives them."""
    x, y = batch
    c = program.contract
    with running(program.where["train"]):
        out = dict(zip(program.outputs, program.train.run(
            program.outputs, step_feeds(c, x, y, program.spec.seed, state.step, lr_numerator, state.tensors))))
    if not np.isfinite(out["loss"]):
        return dataclasses.replace(state, step=state.step + 1, bad_steps=state.bad_steps + 1), None
    metrics = {"loss": float(out["loss"]), "accuracy": float(out["accuracy"])}
    if c.probes is not None and c.probes.coefficients in out:   # a program that outputs them (runtime/fleet.py)
        metrics["coefficients"] = out[c.probes.coefficients]
    return TrainState({s.name: out[s.output] for s in c.state}, state.step + 1, state.bad_steps), metrics


def step_feeds(contract: Contract, x: np.ndarray, y: np.ndarray, seed: int, step: int, lr_numerator: int,
               state) -> dict:
    """The inputs of one training step. seed (< 2^32) and step (< 2^31) are fed as int32, the seed's
    two's-complement bits: the graph's arithmetic is int32 throughout."""
    io = contract.inputs
    return {**feeds(io.data, x), io.labels: y, **scalar_feeds(contract, seed, step, lr_numerator), **state}


def scalar_feeds(contract: Contract, seed: int, step: int, lr_numerator: int) -> dict:
    io = contract.inputs
    return {io.seed: np.array(seed % 2 ** 32, np.uint32).view(np.int32), io.step: np.array(step, np.int32),
            io.lr: np.array(lr_numerator, np.int32)}
