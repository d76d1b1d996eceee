"""Stacked vs cloned branches: the same training step compiled both ways, timed side by side.

pair stacks the 2m branches on one axis (one node per suffix node, a wide Gemm/MatMul); the fallback
clones the suffix per branch. This asks for the fallback (TrainSpec(branches="cloned")) for a suffix that
stacks, so the two graphs compute the same step (tests/passes/test_branch_stacking.py checks that) and
differ only in form.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fgcompile.compiler import compile_model
from fgcompile.session import make_session
from fgcompile.spec import TrainSpec
from step_cost import step_feeds, timed


def measure(source, spec: TrainSpec, x: np.ndarray, y: np.ndarray, threads: int = 1, repeats: int = 7,
            calls: int = 100) -> dict:
    stacked = compile_model(source, dataclasses.replace(spec, branches="stacked"))
    cloned = compile_model(source, dataclasses.replace(spec, branches="cloned"))
    runs = {}
    for name, c in (("stacked", stacked), ("cloned", cloned)):
        sess = make_session(c.train, threads, training=True)
        outputs = [o.name for o in sess.get_outputs()]
        feeds = step_feeds(c.contract, x, y, 1, c.state)
        runs[name] = (lambda s=sess, o=outputs, f=feeds: s.run(o, f))
    t = timed(runs, repeats, calls)
    return {"m": spec.m, "batch": len(y), "us": {k: round(v, 1) for k, v in t.items()},
            "nodes": {"stacked": len(stacked.train.graph.node), "cloned": len(cloned.train.graph.node)},
            "cloned_over_stacked": round(t["cloned"] / t["stacked"], 3)}
