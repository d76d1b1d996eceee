"""pair: the 2m perturbed forward passes, sharing every node upstream of the trained tensors.

    W± = clip(W̃ ± ε·stride·zᵢ, qmin, qmax)   in int32, cast back to W's dtype; one [2m, *shape] tensor with
                                            branches +0, …, +(m−1), −0, …, −(m−1). A large tensor
                                            is perturbed in its own dtype instead (the same values):
                                            W + clip(±ε·stride·zᵢ, qmin − W, qmax − W), int8 steps
    W̃ = W, or clip(W + ascent, qmin, qmax) with a sharpness-aware ascent (passes/momentum.py)

The nodes that depend on a trained tensor (the trained suffix) run on all 2m branches at once, with the
branches on a leading axis (passes/branch_rules.py). Where some suffix op cannot carry that axis, the suffix is
cloned once per branch instead and the branch outputs are stacked. The frozen prefix stays single. The
unperturbed suffix is removed: a training step never needs it (the eval graph has it).

Precondition: ctx.perturbations.z (and .z_at for --branches loop) from prng, ctx.state from lift; the model output depends on every trained
tensor; no node of the suffix holds a subgraph or draws random numbers. Node order does not matter
(pair sorts the graph: the branch rules and clones read the suffix in topological order).
Postcondition: ctx.branches.logits is float [2m, *loss_tap shape] (or [B, 2m, C] with
logits_branch_axis 1); .w32[name] is the int32 view of each state input (update reuses it); .form says
which form was built and .reason why it is not stacked; the original suffix is gone.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fgcompile import bounds
from fgcompile.errors import CompileError
from .context import Branches, Context, Pass
from .formulas import Z_MAX, chunked, compute_shape, elements_per_word, train_bytes
from .graph_ops import Builder, bypass_requant, clone_nodes, downstream_nodes, upstream_nodes
from .branch_rules import Refusal, stack_suffix

UNCLONABLE = {"If", "Loop", "Scan", "RandomNormal", "RandomUniform", "RandomNormalLike",
              "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}


CLONE_FROM = 4096      # values per example of the suffix's largest activation from which auto clones
CLONE_NODES = 16384    # nor past this many cloned nodes (2m copies of the suffix): session creation grows
CLONE_WEIGHTS = 1 << 26   # nor past this many frozen weights over the 2m copies: each copy prepacks its own


def _frozen_weights(needed) -> int:
    """Elements of the frozen constants the suffix reads, directly or through a DequantizeLinear."""
    inside, seen = {id(n) for n in needed}, {}
    for node in needed:
        for t in node.inputs:
            if isinstance(t, gs.Variable) and t.inputs and t.inputs[0].op == "DequantizeLinear" \
                    and id(t.inputs[0]) not in inside:
                t = t.inputs[0].inputs[0]
            if isinstance(t, gs.Constant):
                seen[t.name] = t.values.size
    return sum(seen.values())


def _form(ctx: Context, needed) -> tuple[str, str | None]:
    """(form, reason). auto: the loop where the stacked weights alone would exceed --memory-budget; cloned
    where the suffix's activations reach CLONE_FROM values per example (each branch then runs at batch B
    with cache-sized tensors: the cloned step took 0.80-0.98x the stacked one on ViT, MobileNetV2 and DS-CNN
    past the last layer, 1.03-1.05x on ResNet-18; benchmarks/deep.py --also stacked) and the 2m copies
    stay within CLONE_NODES (onnxruntime's session creation, which compile runs to check the graph, grows
    with them: ResNet-50's mid conv at m = 32, 64 copies of ~130 nodes, compiles in 5.0 s against 1.0
    stacked) and their frozen weights within CLONE_WEIGHTS (onnxruntime prepacks a weight per node: ResNet-18's
    mid conv, 10.2M frozen weights after it, peaked at 2.86x inference cloned against 1.38x stacked, and
    ran 5-11% slower); else stacked (a small suffix's cost is its node count, which stacking keeps flat in m)."""
    if ctx.spec.branches != "auto":
        return ctx.spec.branches, None
    if ctx.spec.memory_budget_mb is not None:
        need = sum(train_bytes(tr.tensor.numel, np.dtype(tr.tensor.dtype).itemsize, ctx.spec.m,
                               momentum=ctx.spec.momentum, sharpness=ctx.spec.sharpness, conv=tr.op == "Conv")
                   for tr in ctx.trainables)
        if need > ctx.spec.memory_budget_mb * 2 ** 20:
            return "loop", f"stacked weights need {need / 2 ** 20:.0f} MB > --memory-budget {ctx.spec.memory_budget_mb:g}"
    widest = max((int(np.prod(t.shape[1:])) for n in needed for t in n.outputs
                  if t.shape and all(isinstance(d, int) for d in t.shape[1:])), default=0)
    copies = 2 * ctx.spec.m
    if widest >= CLONE_FROM and copies * len(needed) <= CLONE_NODES and copies * _frozen_weights(needed) <= CLONE_WEIGHTS:
        return "cloned", (f"auto: the trained suffix's activations reach {widest} values per example; one "
                          "suffix per branch at batch B runs faster than one at 2m·B")
    return "auto", None


def _perturbed(b: Builder, ctx: Context, w32, tr, z, count: int, sign=None):
    """[2·count, *shape] weights W ± ε·stride·z for int32 z [count, *shape], saturated to the trainable range;
    with `sign` (an int32 [1] tensor of ±1: the loop form's one branch) [count, *shape] W + sign·ε·stride·z."""
    cs, w = compute_shape(tr.shape), w32[tr.name]
    if cs != list(tr.shape):     # formulas.compute_shape: scalar broadcasts on [.., 1, 1] are slow
        w, z = b.view(w, cs), b.view(z, [count] + cs)
    step = np.int32(ctx.spec.eps * tr.stride)
    signed = np.array([1, -1], np.int32).reshape([2] + [1] * (len(cs) + 1)) * step if sign is None else \
        b.i32.Mul(b.i32.Reshape(sign, np.array([1] * (len(cs) + 2), np.int64)), step)
    moved = b.op("Add", [w, b.op("Mul", [z, signed], dtype=np.int32)], dtype=np.int32)
    both = b.op("Reshape", [b.clip_int32(moved, tr.qmin, tr.qmax), np.array([-1] + list(tr.tensor.shape),
                                                                            np.int64)], dtype=np.int32)
    out = b.cast(both, np.dtype(tr.tensor.dtype), hint=f"{tr.name}.perturbed")
    out.shape = [(2 if sign is None else 1) * count] + list(tr.tensor.shape)
    return out


UNSIGNED = {np.dtype(np.int8): np.uint8, np.dtype(np.uint8): np.uint8, np.dtype(np.int16): np.uint16,
            np.dtype(np.uint16): np.uint16}
ROOM = 127       # the int8 step: |ε·stride·z| <= ROOM lets a branch move W in W's own dtype


def _in_own_dtype(ctx: Context, tr) -> bool:
    """Whether tr is perturbed in its own 8/16-bit dtype: a large tensor (formulas.chunked; a small one
    keeps the int32 form, fewer nodes), no sharpness centre (an int32 W̃) and |ε·stride·z| within int8."""
    return (np.dtype(tr.tensor.dtype) in UNSIGNED and tr.name not in ctx.perturbations.ascent and chunked(tr.shape)
            and ctx.spec.eps * tr.stride * Z_MAX[ctx.spec.perturbation] <= ROOM)


def _perturbed_narrow(b: Builder, ctx: Context, tr, z):
    """([2m, *shape] W ± ε·stride·z in W's own dtype from int8 z [m, *shape], part(b, k, lo=None, hi=None)
    -> branch k alone): the values of _perturbed, with no int32 tensor of the 2m·n elements (int8 steps,
    their saturation, one widening and the Add). A trained Conv builds each branch's kernel with `part`
    from its row of z (copying no [2m, *shape] tensor apart); other consumers read the whole tensor."""
    m, w, shape, cs = ctx.spec.m, ctx.state.inputs[tr.name], list(tr.shape), compute_shape(tr.shape)
    if cs != shape:     # formulas.compute_shape: scalar broadcasts on [.., 1, 1] are slow
        w, z = b.view(w, cs), b.view(z, [m] + cs)
    unit, rooms, rows = ctx.spec.eps * tr.stride, _rooms(b, w, tr), []
    step = np.array([1, -1], np.int8).reshape([2] + [1] * (len(cs) + 1)) * np.int8(unit)
    whole = b.op("Reshape", [_moved(b, tr, w, z, step, rooms), np.array([-1] + shape, np.int64)],
                 dtype=np.dtype(tr.tensor.dtype), shape=[2 * m] + shape, hint=f"{tr.name}.perturbed")

    def part(b_: Builder, k: int, lo=None, hi=None):
        if not rows:        # z's m rows, split once for all branches
            split = z if m == 1 else b.op("Split", [z], {"axis": 0, "num_outputs": m}, dtype=np.int8, outputs=m)
            rows.extend(b.op("Squeeze", [r, np.array([0], np.int64)], dtype=np.int8) for r in
                        ([split] if m == 1 else split))
        parts = [w, rows[k % m], *rooms]
        if lo is not None:
            parts = [b_.rows(t, lo, hi) for t in parts]
        moved = _moved(b_, tr, parts[0], parts[1], np.array(unit if k < m else -unit, np.int8), parts[2:])
        return moved if cs == shape else b_.view(moved, ([hi - lo] if lo is not None else shape[:1]) + shape[1:])
    return whole, part


def _rooms(b: Builder, w, tr):
    """(up, −down): int8 min(qmax − W, 127) and −min(W − qmin, 127) of W in its own dtype. The differences
    wrap there, and read unsigned they are exact (qmax − qmin < 2^bits), so no int32 copy of W exists.
    Assumes W within [qmin, qmax], which every step's update keeps."""
    dtype, unsigned = np.dtype(tr.tensor.dtype), UNSIGNED[np.dtype(tr.tensor.dtype)]

    def saturated(x):   # min(x, 127) as int8 (onnxruntime has no Clip, Min or Where on 16-bit integers,
        x = b.cast(x, unsigned)  # and 1.25 no Where on int8: the select is uint8, then a lossless cast)
        over = b.op("Greater", [x, np.array(ROOM, unsigned)], dtype=bool)
        room = b.op("Where", [over, np.array(ROOM, np.uint8), b.cast(x, np.uint8)], dtype=np.uint8)
        return b.cast(room, np.int8, hint="room")
    up = saturated(b.op("Sub", [np.array(tr.qmax, dtype), w], dtype=dtype))
    down = saturated(b.op("Sub", [w, np.array(tr.qmin, dtype)], dtype=dtype))
    return up, b.op("Neg", [down], dtype=np.int8, hint="down")


def _moved(b: Builder, tr, w, z, step, rooms=None):
    """W + clip(s·ε·stride·z, −down, up) in W's dtype, for int8 z and step = s·ε·stride (int8): the same
    values as clip(W + s·ε·stride·z, qmin, qmax), since |ε·stride·z| <= 127 and the rooms saturate at 127.
    Elementwise, so rows of W and z give those rows of the perturbed weight. `rooms`: W's (up, −down),
    when made already."""
    up, down = rooms if rooms is not None else _rooms(b, w, tr)
    moved = b.op("Max", [b.op("Min", [b.op("Mul", [z, step], dtype=np.int8), up], dtype=np.int8), down],
                 dtype=np.int8, hint="moved")
    dtype = np.dtype(tr.tensor.dtype)
    return b.op("Add", [w, moved if dtype == np.int8 else b.cast(moved, dtype)], dtype=dtype)


def _perturbed_in_own_dtype(b: Builder, ctx: Context, w, tr, z, sign, i):
    """([1, *shape] perturbed weight, part(b, k, lo, hi) -> its rows lo:hi built from rows of W and zᵢ
    alone, or the whole when lo is None): the trained Conv of the loop form builds and dequantizes its kernel a piece at a time, so
    the body holds no whole-tensor temporary. Where a piece starts on a hash word (and no momentum
    guides z), its zᵢ is drawn for that piece alone, and the whole zᵢ is not drawn at all (unused, it is
    cleaned up)."""
    step = b.cast(b.i32.Mul(sign, ctx.spec.eps * tr.stride), np.int8, hint="signed_step")
    whole = b.op("Unsqueeze", [_moved(b, tr, w, z, step), np.array([0], np.int64)],
                 dtype=np.dtype(tr.tensor.dtype), shape=[1] + list(tr.tensor.shape), hint=f"{tr.name}.perturbed")
    inner, n = int(np.prod(tr.shape[1:])), elements_per_word(ctx.spec)

    def part(b_: Builder, k, lo=None, hi=None):      # k: the Loop's one branch
        if lo is None:
            return b_.op("Squeeze", [whole, np.array([0], np.int64)], dtype=whole.dtype)
        if (lo * inner) % n or (hi * inner) % n or ctx.spec.momentum > 0:
            return _moved(b_, tr, b_.rows(w, lo, hi), b_.rows(z, lo, hi), step)
        zi = ctx.perturbations.z_words(b_, tr.name, np.array([lo * inner // n], np.int32), (hi - lo) * inner // n, i)
        zi = b_.op("Reshape", [zi, np.array([hi - lo] + list(tr.shape[1:]), np.int64)], dtype=np.int8)
        return _moved(b_, tr, b_.rows(w, lo, hi), zi, step)
    return whole, part


def _looped(b: Builder, graph: gs.Graph, ctx: Context, w32, needed):
    """Memory-bounded form: an ONNX Loop over the 2m branches. Iteration k draws zᵢ, i = k mod m, from the
    counter (prng's z_at), builds W + sᵢ·ε·zᵢ (s = +1 for k < m, else −1) and runs the suffix once on the
    batch; its [1, B, C] logits leave as a scan output [2m, 1, B, C] (branches +0..+(m−1), −0..−(m−1)), so
    one branch's perturbed weights and activations are alive at a time (estimate sums cᵢ·zᵢ in a second
    Loop that draws zᵢ again). The suffix's frozen weights are dequantized inside the body."""
    m = ctx.spec.m
    body = gs.Graph(name="branch")
    k = gs.Variable("branch_loop/k", dtype=np.int64, shape=[])
    cond = gs.Variable("branch_loop/cond", dtype=bool, shape=[])
    body.inputs = [k, cond]
    bb = Builder(body, "branch_loop")
    i = bb.cast(bb.op("Unsqueeze", [bb.op("Mod", [k, np.array(m, np.int64)], dtype=np.int64),
                                    np.array([0], np.int64)], dtype=np.int64), np.int32)
    sign = bb.op("Where", [bb.op("Less", [k, np.array([m], np.int64)], dtype=bool), np.array([1], np.int32),
                           np.array([-1], np.int32)], dtype=np.int32)
    # zᵢ stands in as a placeholder until the suffix is built: a trained Conv built in pieces draws its
    # own, and one hash then draws zᵢ for the tensors used whole only
    z = {tr.name: gs.Variable(bb.name("z"), dtype=np.int8, shape=list(tr.shape)) for tr in ctx.trainables}
    perturbed, parts = {}, {}
    for tr in ctx.trainables:
        w = ctx.state.inputs[tr.name]
        if _in_own_dtype(ctx, tr):
            perturbed[tr.name], parts[tr.name] = _perturbed_in_own_dtype(bb, ctx, w, tr, z[tr.name], sign, i)
        else:
            z32 = bb.cast(bb.op("Unsqueeze", [z[tr.name], np.array([0], np.int64)], dtype=np.int8), np.int32)
            perturbed[tr.name] = _perturbed(bb, ctx, w32, tr, z32, 1, sign)
    frozen_weights_inside(body, needed)
    mapping = stack_suffix(body, needed, perturbed, 1, ctx.io.loss_tap,
                           {perturbed[name].name: f for name, f in parts.items()})
    if isinstance(mapping, Refusal):
        raise CompileError(f"--branches loop: the trained suffix cannot run on a branch axis ({mapping}). "
                           "Use --branches cloned, or train other tensors.")
    one = mapping[ctx.io.loss_tap]
    body.outputs = [bb.op("Identity", [cond], dtype=bool), bb.op("Identity", [one], dtype=np.float32)]
    live = {id(n) for n in upstream_nodes(body.nodes, body.outputs[1].name)}
    used = [tr for tr in ctx.trainables if any(id(n) in live for n in z[tr.name].outputs)]
    drawn = ctx.perturbations.z_at(bb, i, used) if used else {}
    for tr in used:
        for node in list(z[tr.name].outputs):
            node.inputs = [drawn[tr.name] if t is z[tr.name] else t for t in node.inputs]
    body.toposort()
    tail = list(one.shape[2:])     # after [1, B]: static (stack folds and unfolds with them)
    branches = gs.Variable("pair/logits_branches", dtype=np.float32)
    graph.nodes.append(gs.Node("Loop", b.name("loop"), {"body": body},
                               [b.const(np.array(2 * m, np.int64)), b.const(np.array(True))], [branches]))
    # [2m, 1, B, ...] -> [2m, B, ...] (onnx.reference's Loop concatenates scan outputs, [2m, B, ...], where
    # onnxruntime stacks them: the same memory either way)
    return b.op("Reshape", [branches, np.array([2 * m, -1] + tail, np.int64)], dtype=np.float32, hint="logits_all")


def frozen_weights_inside(body: gs.Graph, needed) -> None:
    """Dequantize the suffix's frozen weights inside the Loop body: onnxruntime then sees DQ → Conv → Q
    there and runs QLinearConv on the int8 weights, as inference does. Read from outside the body, each
    weight arrives as a float tensor (the DequantizeLinear folded to a float initializer, 4 bytes per
    parameter) and its Conv runs in float. Mutates `needed`, which pair removes anyway."""
    inside, copies = {id(n) for n in needed}, {}
    for node in needed:
        for k, t in enumerate(node.inputs):
            p = t.inputs[0] if t is not None and t.inputs else None
            if p is None or id(p) in inside or p.op != "DequantizeLinear" or \
                    not all(isinstance(x, gs.Constant) for x in p.inputs):
                continue
            if t.name not in copies:
                copies[t.name] = gs.Variable(t.name + "__in_loop", dtype=t.dtype, shape=t.shape)
                body.nodes.append(gs.Node("DequantizeLinear", p.name + "__in_loop", dict(p.attrs), list(p.inputs),
                                          [copies[t.name]]))
            node.inputs[k] = copies[t.name]


def _cloned(b: Builder, graph: gs.Graph, ctx: Context, suffix, perturbed, parts):
    """One copy of the suffix per branch, outputs stacked on a new leading axis. A tensor perturbed in its
    own dtype gives each copy its branch alone (`parts`), so no [2m, *shape] tensor is built."""
    outs = []
    for k in range(2 * ctx.spec.m):
        tag = f"__{'p' if k < ctx.spec.m else 'n'}{k % ctx.spec.m}"
        replace = {tr.name: parts[tr.name](b, k) if tr.name in parts else
                   b.op("Gather", [perturbed[tr.name], np.array(k, np.int64)], {"axis": 0},
                        dtype=np.dtype(tr.tensor.dtype), hint=f"w{tag}") for tr in ctx.trainables}
        mapping = clone_nodes(graph, suffix, replace, tag)
        outs.append(b.op("Unsqueeze", [mapping[ctx.io.loss_tap], np.array([0], np.int64)], dtype=np.float32))
    return b.op("Concat", outs, {"axis": 0}, dtype=np.float32, hint="logits_all")


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    b = Builder(graph, "pair")
    tap = ctx.io.loss_tap
    # the branch rules and clones read the suffix in topological order; a pass may have appended a node
    # that feeds an earlier one (precondition's whitening MatMul before a deeper trained Gemm)
    graph.toposort()
    suffix = downstream_nodes(graph, list(ctx.state.inputs.values()))
    for node in suffix:
        if node.op in UNCLONABLE:
            raise CompileError(f"node {node.name!r} ({node.op}) lies on the trained path; fgcompile cannot "
                               "duplicate it per perturbation. Train tensors after it (--train/--last) "
                               "or remove it from the exported model.")
    if not any(tap in (t.name for t in n.outputs) for n in suffix):
        raise CompileError(f"the model output {ctx.io.output!r} does not depend on the trained tensors; "
                           "nothing would learn. Choose other tensors with --train.")
    w32 = {tr.name: b.cast(ctx.state.inputs[tr.name], np.int32) for tr in ctx.trainables}
    centre = {tr.name: b.clip_int32(b.i32.Add(w32[tr.name], ctx.perturbations.ascent[tr.name]), tr.qmin, tr.qmax)
              if tr.name in ctx.perturbations.ascent else w32[tr.name] for tr in ctx.trainables}
    # only the nodes the loss reads: the trailing requantization of the output is not needed per branch
    needed = upstream_nodes(suffix, tap)
    if ctx.spec.requant_bypass:
        needed = upstream_nodes(bypass_requant(needed), tap)
    form, reason = _form(ctx, needed)
    if form == "loop":
        logits = _looped(b, graph, ctx, centre, needed)
    else:
        z, perturbed, parts = ctx.perturbations.z, {}, {}
        for tr in ctx.trainables:
            if _in_own_dtype(ctx, tr):
                perturbed[tr.name], parts[tr.name] = _perturbed_narrow(b, ctx, tr, z[tr.name])
            else:
                perturbed[tr.name] = _perturbed(b, ctx, centre, tr, b.as_int32(z[tr.name], hint="z32"), ctx.spec.m)
        mapping = "--branches cloned" if form == "cloned" else stack_suffix(
            graph, needed, perturbed, 2 * ctx.spec.m, tap, {perturbed[n].name: f for n, f in parts.items()})
        if isinstance(mapping, Refusal) and form == "stacked":
            raise CompileError(f"--branches stacked: the trained suffix cannot run on a branch axis "
                               f"({mapping}). Use --branches auto or cloned, or train other tensors.")
        reason = None if isinstance(mapping, dict) else reason or str(mapping)
        form = "stacked" if isinstance(mapping, dict) else "cloned"
        if form == "cloned":
            bounds.check_cloned(len(graph.nodes) - len(needed), len(needed), 2 * ctx.spec.m, reason or str(mapping))
        logits = mapping[tap] if form == "stacked" else _cloned(b, graph, ctx, needed, perturbed, parts)
    kept = {id(n) for n in suffix}
    graph.nodes = [n for n in graph.nodes if id(n) not in kept]
    graph.outputs = []
    ctx.branches = Branches(w32, *_branch_major(logits), form, reason)
    return graph


def _branch_major(logits) -> tuple[gs.Tensor, int]:
    """(logits, branch axis). The wide product (passes/branch_rules.py) ends in a Transpose [B, 2m, C] ->
    [2m, B, C]; the loss reduces over batch and classes either way, so it may read the Transpose's
    input and skip a copy of all 2m·B·C logits."""
    node = logits.inputs[0] if logits.inputs else None
    if node is not None and node.op == "Transpose" and list(node.attrs.get("perm", [])) == [1, 0, 2]:
        return node.inputs[0], 1
    return logits, 0


PASS = Pass("pair", run, reads=("io", "trainables", "state", "perturbations"), adds=("branches",))
