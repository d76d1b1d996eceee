"""pair: the 2m perturbed forward passes, sharing every node upstream of the trained tensors.

    W± = clip(W ± ε·step·zᵢ, qmin, qmax)   int32, cast back to W's dtype; one [2m, *shape] tensor with
                                            branches +0, …, +(m−1), −0, …, −(m−1)

The nodes that depend on a trained tensor (the trained suffix) run on all 2m branches at once, with the
branches on a leading axis (passes/stack.py). Where some suffix op cannot carry that axis, the suffix is
cloned once per branch instead and the branch outputs are stacked. The frozen prefix stays single. The
unperturbed suffix is removed: a training step never needs it (the eval graph has it).

Precondition: ctx.z from prng; the model output depends on every trained tensor; no node of the
suffix holds a subgraph or draws random numbers.
Postcondition: ctx.branch_logits is float [2m, *loss_tap shape]; ctx.w32[name] is the int32 view of
each state input (update reuses it); ctx.stacked says which form was built; the original suffix is gone.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fgcompile.errors import CompileError
from .context import Context
from .graph_ops import Builder, clone_nodes, downstream_nodes
from .stack import stack_suffix

UNCLONABLE = {"If", "Loop", "Scan", "RandomNormal", "RandomUniform", "RandomNormalLike",
              "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}


def train_bytes(numel: int, grid_bytes: int, m: int, copies: int) -> int:
    """Bytes a step holds for one trained tensor beyond inference (fgcompile/inspect.py explains the
    terms); copies = 2m stacked or cloned, 2 in the loop."""
    return numel * (2 * grid_bytes + 18 * m + 8 + copies * (12 + grid_bytes))


def _form(ctx: Context) -> str:
    """auto: stacked, unless the stacked weights alone would exceed --memory-budget (then the loop)."""
    if ctx.spec.branches != "auto" or ctx.spec.memory_budget_mb is None:
        return ctx.spec.branches
    need = sum(train_bytes(int(np.prod(tr.tensor.shape)), np.dtype(tr.tensor.dtype).itemsize, ctx.spec.m,
                           2 * ctx.spec.m) for tr in ctx.trainables)
    if need > ctx.spec.memory_budget_mb * 2 ** 20:
        ctx.branches_reason = f"stacked weights need {need / 2 ** 20:.0f} MB > --memory-budget {ctx.spec.memory_budget_mb:g}"
        return "loop"
    return "auto"


def _perturbed(b: Builder, ctx: Context, tr, z, count: int):
    """[2·count, *shape] weights W ± ε·step·z for z [count, *shape], saturated to the trainable range."""
    rank = len(tr.tensor.shape)
    signed = np.array([1, -1], np.int32).reshape([2] + [1] * (rank + 1)) * np.int32(ctx.spec.eps * tr.step)
    moved = b.op("Add", [ctx.w32[tr.name], b.op("Mul", [z, signed], dtype=np.int32)], dtype=np.int32)
    both = b.op("Reshape", [b.clip_int32(moved, tr.qmin, tr.qmax), np.array([-1] + list(tr.tensor.shape),
                                                                            np.int64)], dtype=np.int32)
    out = b.cast(both, np.dtype(tr.tensor.dtype), hint=f"{tr.name}.perturbed")
    out.shape = [2 * count] + list(tr.tensor.shape)
    return out


def _looped(graph: gs.Graph, ctx: Context, needed):
    """Memory-bounded form: an ONNX Loop over the m perturbation pairs. Iteration i builds W ± ε·zᵢ and
    runs the suffix stacked on 2 branches; its [2, B, C] logits leave as a scan output [m, 2, B, C], so
    only one pair's activations are alive at a time (peak memory near inference)."""
    m = ctx.spec.m
    body = gs.Graph(name="branch_pair")
    i = gs.Variable("pair_loop/i", dtype=np.int64, shape=[])
    cond = gs.Variable("pair_loop/cond", dtype=bool, shape=[])
    body.inputs = [i, cond]
    bb = Builder(body, "pair_loop")
    index = bb.op("Unsqueeze", [i, np.array([0], np.int64)], dtype=np.int64)
    perturbed = {tr.name: _perturbed(bb, ctx, tr, bb.op("Gather", [ctx.z[tr.name], index], {"axis": 0},
                                                         dtype=np.int32), 1) for tr in ctx.trainables}
    mapping, reason = stack_suffix(body, needed, perturbed, 2, ctx.loss_tap)
    if mapping is None:
        raise CompileError(f"--branches loop: the trained suffix cannot run on a branch axis ({reason}). "
                           "Use --branches cloned, or train other tensors.")
    pair = mapping[ctx.loss_tap]
    body.outputs = [bb.op("Identity", [cond], dtype=bool), bb.op("Identity", [pair], dtype=np.float32)]
    tail = list(pair.shape[2:])     # after [2, B]: static (stack folds and unfolds with them)
    b = Builder(graph, "pair")
    pairs = gs.Variable("pair/logits_pairs", dtype=np.float32)
    graph.nodes.append(gs.Node("Loop", b.name("loop"), {"body": body},
                               [b.const(np.array(m, np.int64)), b.const(np.array(True))], [pairs]))
    # [m, 2, B, ...] -> [2, m, B, ...] -> [2m, B, ...]: branches +0..+(m-1), -0..-(m-1)
    both = b.op("Transpose", [pairs], {"perm": [1, 0] + list(range(2, 2 + len(pair.shape) - 1))}, dtype=np.float32)
    return b.op("Reshape", [both, np.array([2 * m, -1] + tail, np.int64)], dtype=np.float32, hint="logits_all")


def _cloned(b: Builder, graph: gs.Graph, ctx: Context, suffix, perturbed):
    """Fallback: one copy of the suffix per branch, outputs stacked on a new leading axis."""
    outs = []
    for k in range(2 * ctx.spec.m):
        tag = f"__{'p' if k < ctx.spec.m else 'n'}{k % ctx.spec.m}"
        replace = {tr.name: b.op("Gather", [perturbed[tr.name], np.array(k, np.int64)], {"axis": 0},
                                 dtype=np.dtype(tr.tensor.dtype), hint=f"w{tag}") for tr in ctx.trainables}
        mapping = clone_nodes(graph, suffix, replace, tag)
        outs.append(b.op("Unsqueeze", [mapping[ctx.loss_tap], np.array([0], np.int64)], dtype=np.float32))
    return b.op("Concat", outs, {"axis": 0}, dtype=np.float32, hint="logits_all")


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
    for tr in ctx.trainables:
        ctx.w32[tr.name] = b.cast(ctx.state_in[tr.name], np.int32)
    # only the nodes the loss reads: the trailing requantization of the output is not needed per branch
    needed = _needed(suffix, ctx.loss_tap)
    if ctx.spec.requant_bypass:
        needed = _needed(_bypass_requant(needed), ctx.loss_tap)
    form = _form(ctx)
    if form == "loop":
        ctx.branches, ctx.branch_logits = "loop", _looped(graph, ctx, needed)
    else:
        perturbed = {tr.name: _perturbed(b, ctx, tr, ctx.z[tr.name], ctx.spec.m) for tr in ctx.trainables}
        mapping, ctx.branches_reason = (None, "--branches cloned") if form == "cloned" else \
            stack_suffix(graph, needed, perturbed, 2 * ctx.spec.m, ctx.loss_tap)
        if mapping is None and form == "stacked":
            raise CompileError(f"--branches stacked: the trained suffix cannot run on a branch axis "
                               f"({ctx.branches_reason}). Use --branches auto or cloned, or train other tensors.")
        ctx.branches = "stacked" if mapping is not None else "cloned"
        ctx.branch_logits = mapping[ctx.loss_tap] if mapping else _cloned(b, graph, ctx, needed, perturbed)
    kept = {id(n) for n in suffix}
    graph.nodes = [n for n in graph.nodes if id(n) not in kept]
    graph.outputs = []
    return graph


def _needed(suffix, tap: str):
    """The suffix nodes that `tap` depends on, in graph order."""
    by_output = {t.name: n for n in suffix for t in n.outputs}
    need, stack = set(), [tap]
    while stack:
        node = by_output.get(stack.pop())
        if node is not None and id(node) not in need:
            need.add(id(node))
            stack.extend(t.name for t in node.inputs if t is not None)
    return [n for n in suffix if id(n) in need]


WEIGHTED = {"Conv", "ConvTranspose", "MatMul", "Gemm", "ConvInteger", "MatMulInteger"}


def _bypass_requant(nodes):
    """Read each activation Q→DQ pair after the suffix's last weighted op (Conv, MatMul, Gemm) as its
    float input. There, on a uint8 grid, most ±ε steps of a weight vanish in the rounding and the losses
    see a staircase (the transformer's classifier requantizes its MatMul output before the bias Add).
    Before a weighted op the pair stays: it is what lets onnxruntime run that op as an int8 kernel, and
    a mid-network step spent 1783 of 1885 ms in float Conv without it. The deployed model keeps its
    requantization everywhere (only the branches skip it). Mutates `nodes`, which pair removes anyway."""
    made = {t.name: n for n in nodes for t in n.outputs}
    before_weighted = set()   # ids of nodes with a weighted op downstream (or that are one)
    for node in reversed(nodes):
        if node.op in WEIGHTED or any(id(c) in before_weighted for t in node.outputs for c in t.outputs):
            before_weighted.add(id(node))
    for node in nodes:
        if id(node) in before_weighted:
            continue
        for k, t in enumerate(node.inputs):
            dq = made.get(t.name)
            q = made.get(dq.inputs[0].name) if dq is not None and dq.op == "DequantizeLinear" else None
            if q is not None and q.op == "QuantizeLinear" and not isinstance(q.inputs[0], gs.Constant):
                node.inputs[k] = q.inputs[0]
    return nodes
