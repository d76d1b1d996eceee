"""pair: the 2m perturbed forward passes, sharing every node upstream of the trained tensors.

    W±ᵢ = clip(W ± ε·step·zᵢ, qmin, qmax)      computed in int32, cast back to W's dtype

The nodes that depend on a trained tensor (the trained suffix) are cloned once per branch, in the order
+0, …, +(m−1), −0, …, −(m−1); the frozen prefix stays single. The unperturbed suffix is removed: a
training step never needs it (the eval graph has it).

Precondition: ctx.z from prng; the model output depends on every trained tensor; no node of the
suffix holds a subgraph or draws random numbers.
Postcondition: ctx.branch_logits holds the 2m branch outputs; the original suffix is gone.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fgcompile.errors import CompileError
from .context import Context
from .graph_ops import Builder, clone_nodes, downstream_nodes

UNCLONABLE = {"If", "Loop", "Scan", "RandomNormal", "RandomUniform", "RandomNormalLike",
              "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}


def _perturbed(b: Builder, ctx: Context, tr, sign: int):
    """[m, *shape] weights W + sign·ε·step·z, saturated to the trainable range."""
    w32 = b.cast(ctx.state_in[tr.name], np.int32)
    delta = b.op("Mul", [ctx.z[tr.name], np.array(ctx.spec.eps * tr.step, np.int32)], dtype=np.int32)
    moved = b.op("Add" if sign > 0 else "Sub", [w32, delta], dtype=np.int32)
    return b.cast(b.clip_int32(moved, tr.qmin, tr.qmax), np.dtype(tr.tensor.dtype))


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    b = Builder(graph, "pair")
    suffix = downstream_nodes(graph, list(ctx.state_in.values()))
    for node in suffix:
        if node.op in UNCLONABLE:
            raise CompileError(f"node {node.name!r} ({node.op}) lies on the trained path; fgcompile cannot "
                               "duplicate it per perturbation. Train tensors after it (--train/--last) "
                               "or remove it from the exported model.")
    if not any(ctx.loss_tap in (t.name for t in n.outputs) for n in suffix):
        raise CompileError(f"the model output {ctx.output!r} does not depend on the trained tensors; "
                           "nothing would learn. Choose other tensors with --train.")
    m = ctx.spec.m
    stacked = {(tr.name, s): _perturbed(b, ctx, tr, s) for tr in ctx.trainables for s in (+1, -1)}
    for sign in (+1, -1):
        for i in range(m):
            tag = f"__{'p' if sign > 0 else 'n'}{i}"
            replace = {tr.name: b.op("Gather", [stacked[tr.name, sign], np.array(i, np.int64)], {"axis": 0},
                                     dtype=np.dtype(tr.tensor.dtype), hint=f"w{tag}")
                       for tr in ctx.trainables}
            mapping = clone_nodes(graph, suffix, replace, tag)
            ctx.branch_logits.append(mapping[ctx.loss_tap])
    kept = {id(n) for n in suffix}
    graph.nodes = [n for n in graph.nodes if id(n) not in kept]
    graph.outputs = []
    return graph
