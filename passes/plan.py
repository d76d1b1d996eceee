"""plan: decide once how the step is estimated, so every later pass reads it instead of re-deriving it.

    estimator  the one given, or for --estimator auto:
               node    when the trained part is deeper than one layer (two sites or more) and node
                       perturbation takes every trained site and every option given (passes/node.py):
                       its variance grows with a layer's outputs, not its weights, and every example is
                       its own sample, where m weight directions spread over 27-59x more weights at depth
                       (benchmarks/README.md, "Node perturbation");
               head    when one layer trains and it writes the logits of a ce or bce loss (passes/head.py):
                       the exact gradient there costs one forward and trained as far as Sign-m-SPSA or further
                       at the shipped classifiers (benchmarks/README.md, "The head estimator") and, at headroom
                       128, at the detector (AUC 0.986, miss rate 3.9% against 0.985, 5.7%);
               node    when one hidden layer trains and node takes it (benchmarks/README.md, "One hidden
                       layer by default"): at digits_cnn's fc1 98.3% against Sign-m-SPSA's 82.0%; at a lone
                       Conv, m = 16: 91.7% against 83.7% at digits_cnn's conv2, 93.9% against 95.3% at the
                       keyword spotter's block3.pw, at 34 suffix forwards a step against 128 and memory near
                       inference;
               sign    otherwise (or where --m is given at one layer): it takes every site and option.
    m          the one given, or 8 for node (2m + 2 suffix forwards; m = 8 trains as far as 64 there; 16 at a
               lone Conv, LONE_CONV_M; under auto 16 where the perturbed layers run over a transformer's
               tokens, TOKEN_M, one of them or more), 64 for weight perturbation (stacked branches make m cheap),
               1 for head (no perturbation).
    schedule   node: the one given, or (auto) alternate where L >= 2 perturbed layers run over tokens and
               each keeps m // L >= 4 directions (ALTERNATE_MIN_DIRECTIONS): direction i perturbs layer i mod L
               only (the transformer's --last 3: 84.2% against 83.2% for all at m = 8), else all.
    headroom   the one given, or DETECTOR_HEADROOM (128) wherever the loss is a one-logit bce (a detector) and
               the step reads the layers' own inputs (head, node), at any depth: the whitened exact step of
               its output layer needs weights far past 4x their pretrained range, and so does node's step of a
               lone hidden layer (block2.pw alone: AUC 0.9876, 4.7% missed at 128; 0.9852, 8.1% at 4); else
               DEFAULT_HEADROOM (4) (fgcompile/spec.py says what each measured).
    exact      the site stepped by its exact gradient (head's; node's output layer at depth), or None.
    weighed    node's perturbed layers weigh their signs by |V| of the clean logit where the loss is bce of one
               logit (a detector), at any depth (passes/node.py): unweighed, a lone hidden Conv of the detector
               did not learn (AUC 0.957 before and after 30 epochs).

Precondition: ctx.trainables (select); the graph as analyze left it.
Postcondition: ctx.plan (with .exact and .weighed); ctx.spec.estimator is sign, spsa, node or head, ctx.spec.m,
ctx.spec.headroom and ctx.spec.node_schedule (all or alternate) are set. The graph is unchanged.
"""
from __future__ import annotations

import dataclasses

import onnx_graphsurgeon as gs

from fgcompile.errors import SpecError
from fgcompile.spec import DEFAULT_HEADROOM, DEFAULT_M, DETECTOR_HEADROOM, READS_ACTIVATIONS
from .context import Context, Pass, Plan
from . import head
from .graph_ops import writes_logits
from .node import option_refusal, site_refusal

LONE_CONV_M = 16    # node at one hidden Conv: m = 8 trailed m = 16 by 1.0 (keyword spotter) and 2.6 (digits) points
# node over a transformer's token MatMuls at depth (benchmarks/README.md, "Depth over a transformer's tokens"):
TOKEN_M = 16        # --last 3 alternate: 85.2% against 84.2% at m = 8; --last 7: 82.7% against 80.4%; mlp1 alone:
# 81.9% against 80.5% (7 seeds)
ALTERNATE_MIN_DIRECTIONS = 4   # alternate where each of L perturbed layers keeps m // L >= 4 directions: --last 3
# (L = 2) gained 1.0 at m = 8 and 0.7 at m = 16; --last 7 (L = 6) lost 2.6 at m = 8 and 2.3 at 16. Not on Convs:
# digits_cnn --last 3 tied (96.9), the detector's --last 3 lost (AUC 0.980 against 0.983)


def _node_refusal(nodes: dict, ctx: Context, sites: list[str]) -> str | None:
    """Why node perturbation cannot train this compile, or None (nodes: the graph's, by name)."""
    return option_refusal(ctx, "node") or next(filter(None, (site_refusal(nodes[site]) for site in sites)), None)


def _one_layer(graph: gs.Graph, nodes: dict, ctx: Context, site: str) -> tuple[str, str, int | None]:
    """(estimator, reason, m or None for the estimator's default) where one layer trains: node perturbation
    at a hidden layer, the exact gradient where that layer writes the logits (of a ce loss or a one-logit
    bce), else weight perturbation (node trails it at every shipped head)."""
    if ctx.spec.m is not None:
        return "sign", f"one layer trains and --m {ctx.spec.m} is given (the head estimator draws no perturbation)", \
            ctx.spec.m
    node = nodes[site]
    if not writes_logits(graph, node, ctx.io.loss_tap):
        refusal = _node_refusal(nodes, ctx, [site])
        if refusal is None:
            m = LONE_CONV_M if node.op == "Conv" else TOKEN_M if _over_tokens(node) else None
            return "node", (f"one hidden {node.op} trains: node perturbation's variance grows with its outputs, "
                            "not its weights"), m
        return "sign", f"one hidden layer trains, and node perturbation cannot: {refusal}", None
    loss = ctx.spec.for_head(ctx.io.head).loss
    if loss == "bce" and not _one_logit_bce(graph, ctx):
        return "sign", ("one layer trains, a head of several Sigmoid labels, where the head estimator is "
                        "unmeasured (it trains a one-logit detector's)"), None
    why = head.refusal(graph, ctx, loss)
    if why is None:
        return "head", "the output layer trains alone: its loss gradient is exact in one forward", None
    return "sign", f"one layer trains, and the head estimator cannot: {why}", None


def _one_logit_bce(graph: gs.Graph, ctx: Context) -> bool:
    """Whether the loss is bce of one label: a detector's one logit."""
    return ctx.spec.for_head(ctx.io.head).loss == "bce" and (graph.tensors()[ctx.io.loss_tap].shape or [None])[-1] == 1


def _over_tokens(node: gs.Node) -> bool:
    """Whether a site is a MatMul over a token axis (input [B, T, D]): a transformer's, whose perturbed outputs
    per example are T times its width."""
    return node.op == "MatMul" and len(node.inputs[0].shape or []) >= 3


def _exact_site(graph: gs.Graph, nodes: dict, ctx: Context, estimator: str, sites: list[str]) -> str | None:
    """The site stepped by its exact gradient: head's one site; under node, where more than one layer trains
    and one writes the logits of a ce or bce loss with a static class axis, that one (passes/node.py)."""
    if estimator == "head":
        return sites[0]
    static = isinstance((graph.tensors()[ctx.io.loss_tap].shape or [None])[-1], int)
    if estimator != "node" or len(sites) < 2 or ctx.spec.for_head(ctx.io.head).loss not in ("ce", "bce") or not static:
        return None
    return next((site for site in sites if writes_logits(graph, nodes[site], ctx.io.loss_tap)), None)


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    spec = ctx.spec
    estimator, reason, m = spec.estimator, "given", spec.m
    sites = list(dict.fromkeys(t.site for t in ctx.trainables))
    nodes = {n.name: n for n in graph.nodes}
    if estimator == "auto":
        refusal = _node_refusal(nodes, ctx, sites) if len(sites) > 1 else None
        if len(sites) == 1:
            estimator, reason, m = _one_layer(graph, nodes, ctx, sites[0])
        elif refusal:
            estimator, reason = "sign", f"node perturbation: {refusal}"
        else:
            estimator, reason = "node", f"{len(sites)} layers train"
    if estimator != "node" and spec.node_schedule == "alternate":
        raise SpecError(f"--node-schedule {spec.node_schedule} applies to --estimator node only, and --estimator auto "
                        f"chose {estimator} here ({reason}). Add --estimator node, or drop --node-schedule.")
    exact = _exact_site(graph, nodes, ctx, estimator, sites)
    perturbed = [s for s in sites if s != exact] if estimator == "node" else []
    tokens = len(perturbed) > 1 and any(_over_tokens(nodes[s]) for s in perturbed)
    if spec.estimator == "auto" and m is None and tokens:
        m, reason = TOKEN_M, f"{reason}; m = {TOKEN_M}: they run over a token axis"
    m = m if m is not None else DEFAULT_M[estimator]
    alternate = tokens and m // len(perturbed) >= ALTERNATE_MIN_DIRECTIONS
    schedule = spec.node_schedule if spec.node_schedule != "auto" else "alternate" if alternate else "all"
    one_logit = _one_logit_bce(graph, ctx)
    detector = one_logit and estimator in READS_ACTIVATIONS
    headroom = spec.headroom if spec.headroom is not None else DETECTOR_HEADROOM if detector else DEFAULT_HEADROOM
    ctx.spec = dataclasses.replace(spec, estimator=estimator, m=m, headroom=headroom, node_schedule=schedule)
    ctx.plan = Plan(estimator, reason, m, exact, weighed=estimator == "node" and one_logit)
    return graph


PASS = Pass("plan", run, reads=("io", "trainables"), adds=("plan",))
