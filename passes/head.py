"""head: the exact gradient of a classifier head's loss at its logits (--estimator head).

The trained layer is the one whose output y is the logits the loss reads (the loss tap). There the loss's
gradient is local and exact, with no perturbation and no backpropagation:

    e_b = softmax(y_b) − onehot(label_b)    (ce)        e_b = sigmoid(y_b) − label_b    (bce)
    V_b = QuantizeLinear(e_b, 2^-7, 0)      int8: round half to even, saturated to [−128, 127] (|e| <= 1)
    ĝ_W = Σ_b a_b ⊗ V_b,  ĝ_bias = Σ_b V_b  as node perturbation's from its V (passes/node.py layer_gradient:
                                          the clean integer input a = q − zp, whitened with --calibration)
    ĝ ← ĝ / 2^G_SHIFT                      rounded half away from 0
    then the integer update (update.py) unchanged. (node.exact_gradient; node perturbation steps its output
    layer at depth the same way.)

It is one clean forward of the graph as lifted (the trained weights read from the state): no branches and no
perturbed copy, so a step costs a forward plus one [in, B]·[B, out] MatMulInteger. V is where the step leaves
float (the contract's coefficients, [B, out]); like node perturbation's, the step reads the layer's input, so
it is not replayable from V alone.

Precondition (refused with a SpecError otherwise): one trained site, a Gemm/MatMul as node perturbation takes
it (passes/node.py), whose output is the loss tap up to a requantization and a bias Add (the gradient passes
both unchanged; with the requant bypass the forward reads the float product there, as the branches of weight
perturbation do); the loss ce or bce.
Postcondition: ctx.branches (logits [1, *tap shape], form "none"), ctx.node (the one layer, noise unset);
then `estimate` (ESTIMATE here) gives ctx.estimate.grad[name] int32 [*shape] and .coefficients V (int8 [B, out]).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fgcompile.errors import SpecError
from .context import Branches, Context, Estimate, NodeLayer, Pass
from .graph_ops import Builder, bypass_requant, downstream_nodes, writes_logits
from .node import exact_gradient, layer_parts, option_refusal, site_refusal

LOSSES = ("ce", "bce")


def refusal(graph: gs.Graph, ctx: Context, loss: str) -> str | None:
    """Why the head estimator cannot train this compile (its resolved loss `loss`), or None."""
    sites = list(dict.fromkeys(t.site for t in ctx.trainables))
    if len(sites) != 1:
        return f"{len(sites)} layers train; it trains the output layer alone"
    node = next(n for n in graph.nodes if n.name == sites[0])
    if node.op not in ("Gemm", "MatMul"):
        return f"site {sites[0]!r} is a {node.op}, not a Gemm/MatMul"
    why = site_refusal(node)      # it reads the layer's input as node perturbation does
    if why:
        return why
    if not writes_logits(graph, node, ctx.io.loss_tap):
        return f"site {sites[0]!r} does not write the logits the loss reads ({ctx.io.loss_tap!r})"
    classes = (graph.tensors()[ctx.io.loss_tap].shape or [None])[-1]
    if not isinstance(classes, int):
        return f"its logits {ctx.io.loss_tap!r} have no static class axis"
    if loss not in LOSSES:
        return f"--loss {loss} (its gradient at the logits is ce's or bce's only)"
    return option_refusal(ctx, "head")


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    why = refusal(graph, ctx, ctx.spec.loss)
    if why:
        raise SpecError(f"--estimator head: {why}. It trains the layer whose output is the logits of a ce or bce "
                        "loss (e.g. --last 1); use --estimator node or sign for other layers.")
    site = ctx.trainables[0].site
    node = next(n for n in graph.nodes if n.name == site)
    q, zp, _, layout, scale, _ = layer_parts(node)
    graph.toposort()
    if ctx.spec.requant_bypass:     # read as the branches of weight perturbation read them (passes/pair.py)
        bypass_requant(downstream_nodes(graph, list(ctx.state.inputs.values())))
    graph.outputs = []      # the model's output (Softmax, output Q/DQ) is no step's: finalize's cleanup drops it
    b = Builder(graph, "head")
    y = graph.tensors()[ctx.io.loss_tap]
    logits = b.op("Unsqueeze", [y, np.array([0], np.int64)], dtype=np.float32, shape=[1] + list(y.shape))
    tr = {t.role: t for t in ctx.trainables}
    white = next((w for w in ctx.step_whitening or [] if w[0].site == site), None)
    ctx.node = [NodeLayer(site, tr.get("weight"), tr.get("bias"), None, q, zp, scale, white, layout)]
    ctx.branches = Branches({t.name: b.cast(ctx.state.inputs[t.name], np.int32) for t in ctx.trainables}, logits, 0,
                            "none", None)
    return graph


def estimate(graph: gs.Graph, ctx: Context) -> gs.Graph:
    b = Builder(graph, "head_estimate")
    logits = b.op("Squeeze", [ctx.branches.logits, np.array([0], np.int64)], dtype=np.float32,
                  shape=list(ctx.branches.logits.shape[1:]))                              # [B, ..., out]
    v, grad = exact_gradient(b, ctx.node[0], logits, ctx.losses.labels, ctx.spec.loss)
    ctx.estimate = Estimate(v, grad)
    return graph


PAIR = Pass("head", run, reads=("io", "trainables", "state"), adds=("branches", "node"))
ESTIMATE = Pass("head estimate", estimate, reads=("trainables", "branches", "losses", "node"), adds=("estimate",))
