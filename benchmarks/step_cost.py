"""Step cost: one training step against plain inference forwards of the original model, same batch,
same process, same thread count.

    step / forward          what training costs over inference (target: <= 1.2 at m = 1)
    step / floor            floor = t(prefix) + 2m · t(suffix): the 2m perturbed forwards with the
                            frozen prefix shared, each a separate run of the split model (target <= 1.10
                            at m = 4)
    step / 2m forwards      the naive way: 2m whole-model forwards
Timings interleave the candidates and take the median of repeated blocks (noisy machines drift).
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from fgcompile.compiler import compile_model
from fgcompile.runtime import trainer
from fgcompile.session import make_session
from fgcompile.spec import TrainSpec
from split import split


def timed(fns: dict, repeats: int, calls: int, warmup: int = 20) -> dict:
    for fn in fns.values():      # warm up: arenas, prepacked weights
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[k].append((time.perf_counter() - t0) / calls)
    return {k: statistics.median(v) * 1e6 for k, v in samples.items()}


def step_feeds(contract, x: np.ndarray, y: np.ndarray, step: int, state: dict) -> dict:
    """A training step's inputs, as the Trainer feeds them (seed 0, the default lr)."""
    return trainer.step_feeds(contract, x, y, 0, step, contract.lr_numerator.default, state)


def measure(source, spec: TrainSpec, x: np.ndarray, y: np.ndarray, threads: int = 1, repeats: int = 7,
            calls: int = 100) -> dict:
    compiled = compile_model(source, spec)
    contract = compiled.contract
    data = contract.inputs.data
    infer = make_session(source, threads)
    train = make_session(compiled.train, threads, training=True)
    prefix_model, suffix_model, boundary = split(source, [s.name for s in contract.state])
    prefix, suffix = make_session(prefix_model, threads), make_session(suffix_model, threads)
    mid = dict(zip(boundary, prefix.run(boundary, {data: x})))
    outputs = [o.name for o in train.get_outputs()]
    state = dict(compiled.state)
    step_no = [0]

    def step():   # as the Trainer runs it: a new seed, the previous step's state fed back
        step_no[0] += 1
        out = dict(zip(outputs, train.run(outputs, step_feeds(contract, x, y, step_no[0], state))))
        state.update({s.name: out[s.output] for s in contract.state})

    t = timed({"forward": lambda: infer.run(None, {data: x}), "step": step,
                "prefix": lambda: prefix.run(boundary, {data: x}), "suffix": lambda: suffix.run(None, mid)},
               repeats, calls)
    m = contract.spec.m
    floor = t["prefix"] + 2 * m * t["suffix"]
    return {"m": m, "batch": len(y), "threads": threads, "branches": contract.branches,
            "train_nodes": len(compiled.train.graph.node), "source_nodes": len(source.graph.node),
            "us": {k: round(v, 1) for k, v in t.items()} | {"floor": round(floor, 1)},
            "step_over_forward": round(t["step"] / t["forward"], 3),
            "step_over_floor": round(t["step"] / floor, 3),
            "step_over_2m_forwards": round(t["step"] / (2 * m * t["forward"]), 3)}
