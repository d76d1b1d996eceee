"""node: node (activity) perturbation of the trained Gemm/MatMul/Conv layers, per example (--estimator node).

For each direction i = 0..m−1 and example b, every trained layer's product output y (after its matmul and
a Gemm's bias, before any requantization) moves by ±ε output LSBs along integer noise uᵢ,b ∈ {±1}^out:

    y±ᵢ,b = y_b ± ε·s_out·uᵢ,b        s_out: the scale of the QuantizeLinear that reads y (ε·s_out LSBs survive it)
    uᵢ,b   = stream i of the layer (prng's per_example; the layer's stream id is its first trainable's index),
             element b·n + j for the n outputs of one example; --node-schedule alternate: 0 unless i mod L = l
             for the layer's place l among the L trained layers (one trained layer per direction)
    sᵢ,b   = sign(L⁺ᵢ,b − L⁻ᵢ,b)          per-example losses (loss.per_example); 0 for a tie: |d| <= 2^-19·max(|L⁺|, |L⁻|, 1)
    V_b    = Σᵢ sᵢ,b·uᵢ,b                int8 (|V| <= m <= 64)
    weighed, where the loss is bce of one logit (a one-label detector), at any depth:
           V_b ← round_half_away(V_b·|V*_b| / 2m)    V*_b: the clean logit's V (e_b = sigmoid(z_b) − y_b on 2^-7,
                                                    the exact output layer's where it trains), so |V| <= 64
           one logit's loss difference is e_b times the logit's, and its sign drops e_b: unweighed, each easy
           negative of a detector pushed as hard as a missed positive, and at --last 2 the scores all drifted
           down (AUC 0.957 before and after 30 epochs; weighed: benchmarks/README.md, "The detector")
    centred, where y is the logits the ce loss reads (y = the loss tap):
           V_b ← V_b − ⌊mean_j V_b,j⌉      (n outputs; mean rounded half away from 0; clipped to ±127, int8)
           the ce loss is blind to a shift of every logit, so its gradient has mean 0 over the outputs; V's
           mean is not 0 (E[sign(δ·u)·u] is not ∝ δ for ±1 noise: ~−1 at the label), and the logits drifted
           up by it until the deployed output QuantizeLinear saturated them all (the test says by how much)
    ĝ_W    = Σ_b a_b ⊗ V_b               a_b = q_b − zp, the layer's clean integer input: one MatMulInteger
                                         [in, rows]·[rows, out] (rows: the examples, times tokens for a 3-D input),
                                         transposed for a Gemm transB weight [out, in]
    ĝ_bias = Σ_b V_b
    a Conv (group 1, 2-D) is the same on its im2col rows: a row per output position (b, y, x), V_b,y,x ∈ Z^O,
    a_b,y,x its input patch (c, i, j) ↦ a[b, c, y·s + i·d − p, x·s + j·d − p] (the zero point outside), so
           ĝ_W[o, c, i, j] = Σ_{b,y,x} V[b, o, y, x]·a[b, c, y·s + i·d − p, x·s + j·d − p]   (_input_rows)
    and a grouped Conv (G groups, depthwise at G = C) takes the input channels of o's group only:
           ĝ_W[o, c, i, j] = Σ_{b,y,x} V[b, o, y, x]·a[b, G(o)·C/G + c, …]   (c < C/G; _grouped_product)
    and a Conv's ĝ_W and ĝ_bias are then divided by its H'·W' output positions (rounded half away from 0):
           a mean over positions, so each tensor's step is sized as a Gemm's, by its examples only. Summed, the
           shared rate let the Convs' steps outgrow the Gemms' (digits_cnn --last 4: conv1 has 64 positions,
           conv2 16; 30 epochs, seed 0: 94.6% summed, 95.6% over √(H'·W'), 97.0% over H'·W')
    whitened (with --calibration): a_b → a'_b ≈ quantize(a_b·P², s) int8, P = (M/(tr M/K) + λI)^(−1/2) of the
    layer's input rows (a Conv's patches, P² = P_c² ⊗ I per channel; passes/precondition.py), so the step
    is ΔW ∝ P²·ĝ_W; the weights stay on their grid. In integers (_whitened): a'_j = clip(⌊(Σ_i (q_i − z)·W_ij
    + d_j/2) / d_j⌋, −128, 127) with W ≈ P²·(s_in/s)·d on two int8 planes (precondition.integer_whitening)
    both saturated to ±NODE_GRAD_MAX; then the integer update (update.py) unchanged.

The output layer at depth: where more than one layer trains and one of them writes the logits of a ce or bce
loss (up to a requantization and a bias Add), that layer gets no noise, and its step is the exact gradient of
passes/head.py (exact_gradient) from the clean logits, which the clean copy then runs up to; the other layers'
loss differences no longer carry its noise. --node-schedule alternate counts the perturbed layers only.

The branches run the trained layers on their shared, unperturbed weights. By default (--branches auto or
loop) they run in an ONNX Loop, one branch at a time on the batch, V is summed in a second Loop and a weight
over formulas.CHUNK elements gets ĝ_W a chunk of rows at a time inside the update's Loop (weight_rows;
memory near inference); --branches stacked makes the 2m noisy forwards one stacked suffix (branch_rules) whose only
branched inputs are the noise tensors. Both give the same steps. The trained layers' clean inputs come from
an unperturbed copy of the suffix up to the deepest of them.

Precondition (refused with a SpecError otherwise): every trained site is a Gemm (transA = 0) or MatMul with
a 2-D weight, or a Conv with a static 2-D kernel, explicit pads and a static input [B, C, H, W];
it reads a per-tensor DequantizeLinear of an integer activation, and its output is read by a per-tensor
QuantizeLinear; ctx.perturbations.per_example from prng.
Postcondition: like pair's (ctx.branches in the loop or stacked form, the suffix replaced) plus ctx.node; then
`estimate` (NODE_ESTIMATE here) gives ctx.estimate.grad[name] int32 [*shape] and .coefficients int32 [m, B].
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fgcompile.errors import SpecError
from . import integer_loss
from .branch_rules import Refusal, stack_suffix
from .context import Branches, Context, Estimate, GradRows, NodeLayer, Pass
from .formulas import NODE_GRAD_MAX, TIE_TOLERANCE, Patches, chunk_rows, chunked
from .graph_ops import Builder, bypass_requant, clone_nodes, downstream_nodes, upstream_nodes
from .pair import frozen_weights_inside

SUPPORTED = "trained Gemm/MatMul and 2-D Conv layers with a quantized input and a requantized output"
V_SCALE = np.float32(2.0 ** -7)    # the exact gradient e in [−1, 1] to int8 steps of 1/128 (a power of two: exact)
# its ĝ is summed at that resolution, then divided by 2^G_SHIFT: the rate's fixed point (numerator >= 1 of 2^8)
# then reaches 16x lower steps, which a Sigmoid detector needs (at the lowest rate without it its weights ran
# to the grid's bounds within an epoch), and ĝ is in node's units (|V| / 16 <= 8 = m)
G_SHIFT = 4
WEIGHED_BOUND = 64      # |V_b·|V*_b| / 2m| <= m·128 / 2m: a weighed signal stays a signed int8 product


class SiteRefused(SpecError):
    """A trained site the node estimator cannot perturb; `reason` is the phrase plan records for auto."""

    def __init__(self, site: str, why: str):
        self.reason = f"site {site!r} {why}"
        super().__init__(f"--estimator node: {self.reason}. It supports {SUPPORTED} for now (e.g. digits_cnn "
                         "--last 2); train such layers, or use --estimator sign.")


def _refuse(site: str, why: str):
    raise SiteRefused(site, why)


def layer_parts(node: gs.Node):
    """(q, zero point, QuantizeLinear scale, layout, input scale, Patches or None) of a trained site, or a
    SpecError naming what is missing."""
    if node.op not in ("Gemm", "MatMul", "Conv") or node.op == "Gemm" and node.attrs.get("transA", 0):
        _refuse(node.name, f"is a {node.op}{' with transA' if node.op == 'Gemm' else ''}")
    dq = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if dq is None or dq.op != "DequantizeLinear" or not all(
            isinstance(t, gs.Constant) and t.values.size == 1 for t in dq.inputs[1:]):
        _refuse(node.name, "does not read a per-tensor dequantized integer activation")
    zp = dq.inputs[2] if len(dq.inputs) > 2 else gs.Constant(f"{node.name}__zero_point",
                                                               np.zeros((), np.dtype(dq.inputs[0].dtype)))
    quant = [c for c in node.outputs[0].outputs if c.op == "QuantizeLinear"]
    if len(quant) != 1 or not isinstance(quant[0].inputs[1], gs.Constant) or quant[0].inputs[1].values.size != 1:
        _refuse(node.name, "has no per-tensor requantization of its output to size the noise by")
    unit, patches = np.float32(quant[0].inputs[1].values.reshape(())), None
    if node.op == "Conv":
        patches = _conv_patches(node)
        return dq.inputs[0], zp, unit, "nk", dq.inputs[1], patches
    if len(node.inputs[1].shape or []) != 2:
        _refuse(node.name, f"has a weight of shape {node.inputs[1].shape}, not 2-D")
    layout = "nk" if node.op == "Gemm" and node.attrs.get("transB", 0) else "kn"
    return dq.inputs[0], zp, unit, layout, dq.inputs[1], patches


def _conv_patches(node: gs.Node) -> Patches:
    """The im2col geometry of a trained 2-D Conv with explicit pads, else a SpecError."""
    shape = node.inputs[1].shape or []
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape):
        _refuse(node.name, f"is a Conv with a weight of shape {shape}, not a static 2-D kernel [O, C, kh, kw]")
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        _refuse(node.name, f"is a Conv with auto_pad {node.attrs['auto_pad']!r} (explicit pads only)")
    image = node.inputs[0].shape
    if not image or len(image) != 4 or not all(isinstance(d, int) for d in image[1:]):
        _refuse(node.name, f"is a Conv with an input of non-static shape {image}")
    return Patches.of_conv(node.attrs, shape)


def option_refusal(ctx: Context, estimator: str) -> str | None:
    """Why `estimator` (node or head: they read the trained layers' outputs) cannot take this compile's options
    or trained tensors, or None (plan and head.refusal ask it)."""
    option = ctx.spec.node_refusal(estimator)
    if option:
        return f"it does not take {option} yet"
    roles = sorted({t.role for t in ctx.trainables} - {"weight", "bias"})
    return f"it trains {roles[0]} tensors, which are not a layer's outputs" if roles else None


def site_refusal(node: gs.Node) -> str | None:
    """Why the node estimator cannot perturb this trained site, or None (plan asks before choosing it)."""
    try:
        layer_parts(node)
    except SiteRefused as exc:
        return exc.reason
    return None


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    b, m = Builder(graph, "node"), ctx.spec.m
    graph.toposort()
    nodes = {n.name: n for n in graph.nodes}
    sites = list(dict.fromkeys(tr.site for tr in ctx.trainables))
    parts = {site: layer_parts(nodes[site]) for site in sites}
    tap = ctx.io.loss_tap
    exact = ctx.plan.exact      # the output layer at depth: its step is the exact gradient (passes/plan.py)
    perturbed = [site for site in sites if site != exact]
    suffix = downstream_nodes(graph, list(ctx.state.inputs.values()))
    needed = upstream_nodes(suffix, tap)
    if ctx.spec.requant_bypass:
        needed = upstream_nodes(bypass_requant(needed), tap)
    outputs = {site: nodes[site].outputs[0] for site in sites}
    noisy = {id(n) for n in downstream_nodes(graph, list(outputs.values()))}
    rewritten = [n for n in needed if id(n) in noisy]         # run on the branch axis, then removed
    # the clean forward up to each trained input made inside the noisy part, before the noise is wired in
    # (and up to the logits where the output layer's step is exact or their |V| weighs the signs)
    ends = [q.name for q, *_ in parts.values()] + ([tap] if exact or ctx.plan.weighed else [])
    upstream = {id(u) for end in ends for u in upstream_nodes(rewritten, end)}
    clean = [n for n in rewritten if id(n) in upstream]
    clean_of = clone_nodes(graph, clean, {}, "__clean")
    # a perturbed layer's own output stays clean (its noise is added after it)
    clean_logits = clean_of.get(tap, graph.tensors()[tap]) if ctx.plan.weighed else None
    layers, stacked, order = [], {}, []
    for site in sites:
        q, zp, unit, layout, scale, patches = parts[site]
        y = outputs[site]
        q_clean = clean_of.get(q.name, q)      # its batch axis is the examples' (y is rewritten below)
        tr = {tr.role: tr for tr in ctx.trainables if tr.site == site}
        white = next((w for w in ctx.step_whitening or [] if w[0].site == site), None)
        if site == exact:
            layers.append(NodeLayer(site, tr.get("weight"), tr.get("bias"), None, q_clean, zp, scale, white, layout,
                                    logits=clean_of[tap]))
            continue
        t = perturbed.index(site)
        stream = next(k for k, tr in enumerate(ctx.trainables) if tr.site == site)
        per = [d for d in y.shape[1:]]
        if not all(isinstance(d, int) for d in per):
            _refuse(site, f"has an output of non-static shape {y.shape}")
        count = b.op("Mul", [b.op("Gather", [b.op("Shape", [q_clean], dtype=np.int64), np.array(0, np.int64)],
                                  dtype=np.int64), np.array(int(np.prod(per)), np.int64)], dtype=np.int64)
        u = b.op("Reshape", [ctx.perturbations.per_example(b, stream, count), np.array([m, -1] + per, np.int64)],
                 dtype=np.int8, shape=[m, y.shape[0]] + per, hint=f"{site}.u")
        if ctx.spec.node_schedule == "alternate" and len(perturbed) > 1:    # direction i: layer i mod L only
            mine = (np.arange(m) % len(perturbed) == t).astype(np.int8).reshape([m] + [1] * (len(per) + 1))
            u = b.op("Mul", [u, mine], dtype=np.int8, shape=[m, y.shape[0]] + per, hint=f"{site}.u_alternate")
        placeholder = gs.Variable(f"node/{site}.noise", dtype=np.float32, shape=y.shape)
        stacked[placeholder.name] = (u, np.float32(ctx.spec.eps) * unit, [y.shape[0]] + per)
        moved = gs.Variable(f"node/{site}.noisy", dtype=np.float32, shape=y.shape)
        for consumer in rewritten:
            consumer.inputs = [moved if x is y else x for x in consumer.inputs]
        tap = moved.name if y.name == tap else tap
        order.append((nodes[site], gs.Node("Add", f"node/{site}.add", {}, [y, placeholder], [moved])))
        centered = y.name == ctx.io.loss_tap and ctx.spec.loss == "ce"
        image = tuple(nodes[site].inputs[0].shape[1:]) if patches else None
        layers.append(NodeLayer(site, tr.get("weight"), tr.get("bias"), u, q_clean, zp, scale, white, layout,
                                centered, patches, image, nodes[site].attrs.get("group", 1)))
    adds = {id(site_node): add for site_node, add in order}
    branched = []
    for n in needed:
        if id(n) in noisy:
            branched.append(n)
        if id(n) in adds:
            branched.append(adds[id(n)])
    # auto: the Loop; as fast as stacked on the real-size and shipped models (0.77-1.05x; 1.27x only on
    # digits_cnn --last 2, 0.13 ms) at a fraction of the memory (benchmarks/README.md, "Node perturbation in
    # the loop form")
    form = "stacked" if ctx.spec.branches == "stacked" else "loop"
    if form == "loop":
        logits = _looped(b, graph, branched, stacked, m, tap)
    else:
        both = lambda u: b.op("Concat", [u, b.op("Neg", [u], dtype=np.int8)], {"axis": 0}, dtype=np.int8)
        noise = {name: b.f32.Mul(b.cast(both(u), np.float32), scale, hint="noise", shape=[2 * m] + shape)
                 for name, (u, scale, shape) in stacked.items()}
        mapping = stack_suffix(graph, branched, noise, 2 * m, tap)
        if isinstance(mapping, Refusal):
            raise SpecError(f"--estimator node runs its branches stacked or in a Loop, and the trained suffix "
                            f"cannot run on a branch axis ({mapping}). Train other layers, or use --estimator sign.")
        logits = mapping[tap]
    kept = {id(n) for n in needed if id(n) not in noisy}     # the trained layers' clean products, weight DQs
    gone = {id(n) for n in suffix if id(n) not in kept}
    graph.nodes = [n for n in graph.nodes if id(n) not in gone]
    graph.outputs = []
    w32 = {tr.name: b.cast(ctx.state.inputs[tr.name], np.int32) for tr in ctx.trainables}
    ctx.branches = Branches(w32, logits, 0, form, None, clean_logits)
    ctx.node = layers
    return graph


def _looped(b: Builder, graph: gs.Graph, branched, noise: dict, m: int, tap: str):
    """--branches loop: an ONNX Loop over the 2m branches; iteration k adds ±ε·u of direction k mod m (+ for
    k < m) to each layer's output (u int8 [m, B, *out], scaled inside) and runs the noisy suffix once on the
    batch, its logits leaving as a scan output [2m, 1, B, ...]: one branch's activations are alive at a time
    (pair's loop form does the same for weight perturbation, whose frozen_weights_inside it shares).
    Returns the logits [2m, B, ...]."""
    body = gs.Graph(name="node_branch")
    k = gs.Variable("node_loop/k", dtype=np.int64, shape=[])
    cond = gs.Variable("node_loop/cond", dtype=bool, shape=[])
    body.inputs = [k, cond]
    bb = Builder(body, "node_loop")
    row = bb.op("Unsqueeze", [bb.op("Mod", [k, np.array(m, np.int64)], dtype=np.int64), np.array([0], np.int64)],
                dtype=np.int64)
    sign = bb.op("Where", [bb.op("Less", [k, np.array(m, np.int64)], dtype=bool), np.float32(1), np.float32(-1)],
                 dtype=np.float32)
    one = {name: bb.f32.Mul(bb.cast(bb.op("Gather", [u, row], {"axis": 0}, dtype=np.int8), np.float32),
                            bb.f32.Mul(sign, scale), hint="noise", shape=[1] + shape)
           for name, (u, scale, shape) in noise.items()}
    frozen_weights_inside(body, branched)
    mapping = stack_suffix(body, branched, one, 1, tap)
    if isinstance(mapping, Refusal):
        raise SpecError(f"--estimator node --branches loop: the trained suffix cannot run on a branch axis "
                        f"({mapping}). Train other layers, or use --estimator sign.")
    out = mapping[tap]
    body.outputs = [bb.op("Identity", [cond], dtype=bool), bb.op("Identity", [out], dtype=np.float32)]
    body.toposort()
    scanned = gs.Variable("node/logits_branches", dtype=np.float32)
    graph.nodes.append(gs.Node("Loop", b.name("loop"), {"body": body},
                               [b.const(np.array(2 * m, np.int64)), b.const(np.array(True))], [scanned]))
    # [2m, 1, B, ...] -> [2m, B, ...] (onnx.reference concatenates scan outputs where onnxruntime stacks them)
    return b.op("Reshape", [scanned, np.array([2 * m, -1] + list(out.shape[2:]), np.int64)], dtype=np.float32,
                hint="logits_all")


def _input_rows(b: Builder, layer: NodeLayer):
    """The clean integer input as rows [rows, in]: a Gemm/MatMul's rows of q; a Conv's im2col patches of q,
    padded with its zero point (a = 0 there), by one Gather of precomputed indices. The patches rather
    than a ConvInteger of the input with V as its kernel: the same rows then serve the whitened step
    (a' = quantize(patches·P², s), a [C·kh·kw]² product per row) and the Gemm sites' one MatMulInteger; the
    gather is exact, and costs kh·kw times one batch of the layer's input."""
    if layer.patches is None:
        return b.op("Reshape", [layer.q, np.array([-1, layer.q.shape[-1]], np.int64)], dtype=layer.q.dtype)
    (c, h, w), (pt, pl, pb, pr) = layer.image, layer.patches.pads
    zero = np.asarray(layer.zero_point.values).reshape(())
    padded = b.op("Pad", [layer.q, np.array([0, 0, pt, pl, 0, 0, pb, pr], np.int64), zero], {"mode": "constant"},
                  dtype=layer.q.dtype)
    flat = b.op("Reshape", [padded, np.array([0, c, -1], np.int64)], dtype=layer.q.dtype)      # [B, C, Hp·Wp]
    taken = b.op("Gather", [flat, layer.patches.indices(h, w)], {"axis": 2}, dtype=layer.q.dtype)  # [B, C, k, P]
    cols = b.op("Reshape", [taken, np.array([0, -1, _positions(layer)], np.int64)], dtype=layer.q.dtype)
    cols = b.op("Transpose", [cols], {"perm": [0, 2, 1]}, dtype=layer.q.dtype)                  # [B, P, C·k]
    return b.op("Reshape", [cols, np.array([-1, c * int(np.prod(layer.patches.kernel))], np.int64)],
                dtype=layer.q.dtype, hint="patches")


def _grouped_product(b: Builder, a, v, zero, groups: int, bound: int | None):
    """A grouped Conv's ĝ_W [G, O/G, C/G·kh·kw]: group k's output channels correlate with its own input
    channels only, one batched MatMulInteger [G, C/G·kh·kw, rows]·[G, rows, O/G] (the patch columns (c, i, j)
    of a group are contiguous)."""
    a_g = b.op("Transpose", [b.op("Reshape", [a, np.array([0, groups, -1], np.int64)], dtype=a.dtype)],
               {"perm": [1, 2, 0]}, dtype=a.dtype)                                      # [G, C/G·k, rows]
    v_g = b.op("Transpose", [b.op("Reshape", [v, np.array([0, groups, -1], np.int64)], dtype=v.dtype)],
               {"perm": [1, 0, 2]}, dtype=v.dtype)                                      # [G, rows, O/G]
    g = b.integer_product("MatMulInteger", a_g, v_g, *zero, bound=bound)                  # [G, C/G·k, O/G]
    return b.i32.Transpose(g, perm=[0, 2, 1])


def _position_mean(b: Builder, g, layer: NodeLayer):
    """A Conv's ĝ divided by its H'·W' output positions."""
    return g if layer.patches is None else divided(b, g, _positions(layer))


def divided(b: Builder, g, n: int):
    """int32 g / n rounded half away from 0 (int32 Div truncates)."""
    return b.i32.Div(b.i32.Add(g, b.i32.Mul(b.i32.Sign(g), n // 2)), n, hint="divided")


def _positions(layer: NodeLayer) -> int:
    """H'·W': the output positions of a Conv site."""
    return int(np.prod(layer.patches.out_size(*layer.image[1:])))


def estimate(graph: gs.Graph, ctx: Context) -> gs.Graph:
    b, m = Builder(graph, "node_estimate"), ctx.spec.m
    c = ctx.losses.signs if ctx.losses.signs is not None else _float_signs(b, ctx.losses.per_example, m)  # [m, B]
    s = b.cast(c, np.int8, hint="s")
    # the output layer's exact V (from the clean logits); where the loss is one logit's, |V| weighs the others' V
    outputs = [layer for layer in ctx.node if layer.logits is not None]
    exact_v = {layer.site: _exact_rows(b, layer.logits, ctx.losses.labels, ctx.spec.loss) for layer in outputs}
    if ctx.plan.weighed:      # [B, 1]: |V| of the clean logit, the exact output layer's where it trains
        v_star = exact_v[ctx.plan.exact][0] if ctx.plan.exact in exact_v else \
            _exact_rows(b, ctx.branches.clean_logits, ctx.losses.labels, ctx.spec.loss)[0]
        weight = b.i32.Abs(b.cast(v_star, np.int32), hint="example_weight")
    else:
        weight = None
    grad, by_rows = {}, {}
    for layer in ctx.node:
        exact = layer.logits is not None    # the output layer: its exact gradient from the clean logits
        rows = exact_v[layer.site][1] if exact else _noise_rows(graph, b, layer, c, s, m, ctx.branches.form, weight)
        shift = G_SHIFT if exact else 0
        # |V| (the exact layer's spans int8)
        bound = None if exact else 127 if layer.centered else WEIGHED_BOUND if weight is not None else m
        count = chunk_rows(layer.weight.shape) if ctx.branches.form == "loop" and layer.weight is not None and \
            layer.groups == 1 and chunked(layer.weight.shape) else None
        if count:     # the update takes ĝ_W a chunk of rows at a time, inside its Loop: never whole
            by_rows[layer.weight.name] = weight_rows(b, layer, rows, count, shift, bound)
        grad.update(_shifted(b, layer_gradient(b, layer, rows, weight=not count, bound=bound), shift))
    ctx.estimate = Estimate(c, grad, by_rows)
    return graph


def _noise_rows(graph: gs.Graph, b: Builder, layer: NodeLayer, c, s, m: int, form: str, weight=None):
    """A perturbed layer's output signal V = Σᵢ cᵢ·uᵢ as int8 rows [rows, out] (a Conv's rows are its output
    positions), centred over the outputs where the layer writes the logits; with `weight` (int32 [B, 1]: the
    exact output layer's |V*| where it writes one logit) V_b ← V_b·|V*_b| / 2m, rounded half away from 0."""
    I = b.i32
    v = _signal_sum(graph, layer.noise, c, m, layer.site) if form == "loop" else _signal(b, layer.noise, s)
    if weight is not None:
        w = I.Reshape(weight, np.array([-1] + [1] * (len(layer.noise.shape) - 2), np.int64))   # [B, 1, ...]
        v = divided(b, I.Mul(v, w), 2 * m)
    if layer.patches is not None:                                         # rows: the positions (b, y, x)
        v = I.Transpose(v, perm=[0, 2, 3, 1])
    out = layer.noise.shape[2 if layer.patches is not None else -1]
    rows = I.Reshape(v, np.array([-1, out], np.int64))                    # [rows, out]
    if layer.centered:
        total = I.ReduceSum(rows, np.array([1], np.int64), keepdims=1)
        rows = b.clip_int32(I.Sub(rows, divided(b, total, out)), -127, 127)
    return b.cast(rows, np.int8)


def _shifted(b: Builder, grad: dict, shift: int) -> dict:
    """{name: ĝ / 2^shift} rounded half away from 0 (the exact output layer's G_SHIFT), or grad as given."""
    return {name: divided(b, g, 1 << shift) for name, g in grad.items()} if shift else grad


def _signal(b: Builder, noise, s):
    """V = Σᵢ sᵢ·uᵢ int32 [B, *out] of the noise [m, B, *out] and the signs s int8 [m, B], at once."""
    rank = len(noise.shape)
    si = b.op("Unsqueeze", [s, np.arange(2, rank, dtype=np.int64)], dtype=np.int8) if rank > 2 else s
    return b.i32.ReduceSum(b.cast(b.op("Mul", [noise, si], dtype=np.int8), np.int32), np.array([0], np.int64),
                           keepdims=0, hint="v")


def _signal_sum(graph: gs.Graph, noise, c, m: int, site: str):
    """The same V as a Loop over the m directions adding cᵢ·uᵢ into an int32 [B, *out] carry: the loop form
    holds no [m, B, *out] int32 product (4x the noise's bytes)."""
    b, body = Builder(graph, f"node_signal/{site}"), gs.Graph(name=f"node_signal_sum/{site}")
    bb = Builder(body, f"node_signal_body/{site}")
    i = gs.Variable(bb.name("i"), dtype=np.int64, shape=[])
    cond = gs.Variable(bb.name("cond"), dtype=bool, shape=[])
    carried = gs.Variable(bb.name("v"), dtype=np.int32)
    body.inputs = [i, cond, carried]
    row = bb.op("Unsqueeze", [i, np.array([0], np.int64)], dtype=np.int64)
    ui = bb.op("Squeeze", [bb.op("Gather", [noise, row], {"axis": 0}, dtype=np.int8), np.array([0], np.int64)],
               dtype=np.int8)                                                              # [B, *out]
    ci = bb.op("Squeeze", [bb.op("Gather", [c, row], {"axis": 0}, dtype=np.int32), np.array([0], np.int64)],
               dtype=np.int32)                                                             # [B]
    rank = len(noise.shape) - 1
    ci = bb.op("Unsqueeze", [ci, np.arange(1, rank, dtype=np.int64)], dtype=np.int32) if rank > 1 else ci
    body.outputs = [bb.op("Identity", [cond], dtype=bool, shape=[]),
                    bb.i32.Add(carried, bb.i32.Mul(bb.cast(ui, np.int32), ci), hint="v_next")]
    zero = b.op("Expand", [np.array(0, np.int32), b.op("Shape", [b.op("Gather", [noise, np.array(0, np.int64)],
                                                                       {"axis": 0}, dtype=np.int8)],
                                                        dtype=np.int64)], dtype=np.int32, hint="zero")
    total = gs.Variable(b.name("v"), dtype=np.int32, shape=list(noise.shape[1:]))
    graph.nodes.append(gs.Node("Loop", b.name("loop"), {"body": body},
                               [b.const(np.array(m, np.int64)), b.const(np.array(True))] + [zero], [total]))
    return total


def _weight_input(b: Builder, layer: NodeLayer):
    """(a [rows, in], its zero point as MatMulInteger's input list): the clean integer input rows, or with
    whitening a' (int8, zero point 0: _whitened)."""
    a, zero = _input_rows(b, layer), [layer.zero_point]
    if layer.whitening is not None:
        a, zero = _whitened(b, a, layer), []
    return a, zero


WHITE_PIECE = 129      # inputs per MatMulInteger: each plane's sums stay below 2^23 (OpenVINO sums in float32)


def _whitened(b: Builder, a, layer: NodeLayer):
    """a' = clip(⌊(Σ_i (q_i − z)·W_ij + d_j/2) / d_j⌋, −128, 127), int8 [rows, K], of the input rows a (a Conv's
    (c, i, j) patch rows: W [C, C] mixes each kernel tap's channels), W = 256·W_hi + W_lo and d = 256·e
    (precondition.integer_whitening): per piece of WHITE_PIECE inputs H = Σ (q − z)·W_hi and L = Σ (q − z)·W_lo
    by MatMulInteger, L = 256·⌊L/256⌋ + (L mod 256), and
        a' = ⌊(ΣH + Σ⌊L/256⌋ + ⌊(Σ(L mod 256) + d/2) / 256⌋) / e⌋
    (the same value: ⌊(256X + y)/(256e)⌋ = ⌊(X + ⌊y/256⌋)/e⌋), each floor a division of a non-negative integer
    below 2^24 by a power of two."""
    _, hi, lo, divisors = layer.whitening
    I, channels = b.i32, hi.values.shape[0]
    rows = a
    if layer.patches is not None:     # [R, C·T] → [R·T, C]
        taps = int(np.prod(layer.patches.kernel))
        rows = b.op("Reshape", [b.op("Transpose", [b.op("Reshape", [a, np.array([-1, channels, taps], np.int64)],
                                                             dtype=a.dtype)], {"perm": [0, 2, 1]}, dtype=a.dtype),
                                np.array([-1, channels], np.int64)], dtype=a.dtype)
    floor_div = lambda x, n, offset: I.Sub(I.Div(I.Add(x, np.int32(offset)), np.int32(n)), np.int32(offset // n))
    high = low_hi = low_lo = None
    add = lambda total, x: x if total is None else I.Add(total, x)
    for start in range(0, channels, WHITE_PIECE):
        stop = min(start + WHITE_PIECE, channels)
        part = rows if stop - start == channels else b.op(
            "Slice", [rows, np.array([start], np.int64), np.array([stop], np.int64), np.array([-1], np.int64)],
            dtype=rows.dtype)
        # the contract names these constants, so they stay in the graph (Builder.integer_product would fold a
        # constant into a new one): whole planes pass through an Identity
        plane = lambda w: b.op("Identity", [w], dtype=w.dtype) if stop - start == channels else b.rows(w, start, stop)
        h = b.integer_product("MatMulInteger", part, plane(hi), layer.zero_point)
        l = b.integer_product("MatMulInteger", part, plane(lo), layer.zero_point, np.int8(-128))
        l_hi = floor_div(l, 256, 2 ** 23)
        high, low_hi = add(high, h), add(low_hi, l_hi)
        low_lo = add(low_lo, I.Sub(l, I.Mul(l_hi, np.int32(256))))
    carry = I.Div(I.Add(low_lo, I.Div(divisors, np.int32(2))), np.int32(256))
    inner = I.Clip(I.Add(I.Add(high, low_hi), carry), np.int32(-2 ** 23 + 2 ** 14), np.int32(2 ** 23 - 2 ** 14))
    e = I.Div(divisors, np.int32(256), hint="e")
    white = I.Sub(I.Div(I.Add(inner, np.int32(2 ** 23)), e), I.Div(np.int32(2 ** 23), e))
    white = b.cast(I.Clip(white, np.int32(-128), np.int32(127), hint="white"), np.int8)
    if layer.patches is not None:     # back to [R, C·T]
        white = b.op("Reshape", [b.op("Transpose", [b.op("Reshape", [white, np.array([-1, taps, channels], np.int64)],
                                                                  dtype=np.int8)], {"perm": [0, 2, 1]}, dtype=np.int8),
                                 np.array([-1, channels * taps], np.int64)], dtype=np.int8)
    return white


def weight_rows(b: Builder, layer: NodeLayer, rows, count: int, shift: int = 0, bound: int | None = None) -> GradRows:
    """ĝ_W of a group-1 layer as GradRows: chunk k is rows k·count .. (k+1)·count − 1 of the weight's leading
    axis (output channels for [out, in], inputs for [in, out]), one MatMulInteger of the whole input with a
    slice of V (or of a slice of the input with V), made inside the update's Loop; a and V are made once."""
    a, zero = _weight_input(b, layer)
    a_t = b.op("Transpose", [a], {"perm": [1, 0]}, dtype=a.dtype)                       # [in, rows]
    nk = layer.layout == "nk"

    def at(bb: Builder, k):
        lo = bb.op("Unsqueeze", [bb.op("Mul", [k, np.array(count, np.int64)], dtype=np.int64), np.array([0], np.int64)],
                   dtype=np.int64)
        hi = bb.op("Add", [lo, np.array([count], np.int64)], dtype=np.int64)
        piece = lambda t, axis: bb.op("Slice", [t, lo, hi, np.array([axis], np.int64)], dtype=t.dtype)
        g = bb.integer_product("MatMulInteger", a_t, piece(rows, 1), *zero, bound=bound) if nk else \
            bb.integer_product("MatMulInteger", piece(a_t, 0), rows, *zero, bound=bound)   # [in, c] or [c, out]
        g = _saturated(bb, bb.i32.Transpose(g, perm=[1, 0]) if nk else g, layer, [count] + list(layer.weight.shape[1:]))
        return divided(bb, g, 1 << shift) if shift else g
    return GradRows(count, at)


def _saturated(b: Builder, g, layer: NodeLayer, shape) -> gs.Tensor:
    """A product's ĝ as the update takes it: a Conv's averaged over its output positions, saturated to
    ±NODE_GRAD_MAX, in `shape`."""
    return b.i32.Reshape(b.clip_int32(_position_mean(b, g, layer), -NODE_GRAD_MAX, NODE_GRAD_MAX),
                         np.array(shape, np.int64), hint="g")


def layer_gradient(b: Builder, layer: NodeLayer, rows, weight: bool = True, bound: int | None = None) -> dict:
    """ĝ_W = Σ_rows a ⊗ V and ĝ_bias = Σ_rows V of one trained layer from its int8 output signal V [rows, out]
    (rows as _input_rows gives the input's), a Conv's over its output positions, each saturated to
    ±NODE_GRAD_MAX: {tensor name: int32 ĝ of its shape} (without ĝ_W when `weight` is false: weight_rows).
    bound: the largest |V| where known (Builder.integer_product then keeps a small V signed)."""
    I, grad = b.i32, {}
    if layer.weight is not None and weight:
        a, zero = _weight_input(b, layer)
        if layer.groups > 1:
            g = _grouped_product(b, a, rows, zero, layer.groups, bound)                  # [G, out/G, in/G]
        else:
            a_t = b.op("Transpose", [a], {"perm": [1, 0]}, dtype=a.dtype)                 # [in, rows]
            g = b.integer_product("MatMulInteger", a_t, rows, *zero, bound=bound)        # [in, out]
            g = I.Transpose(g, perm=[1, 0]) if layer.layout == "nk" else g
        grad[layer.weight.name] = _saturated(b, g, layer, layer.weight.shape)
    if layer.bias is not None:
        g = I.ReduceSum(b.cast(rows, np.int32), np.array([0], np.int64), keepdims=0)
        grad[layer.bias.name] = _saturated(b, g, layer, layer.bias.shape)
    return grad


def _float_signs(b: Builder, per, m: int):
    """sign(L⁺ᵢ,b − L⁻ᵢ,b), int32 [m, B], of the float per-example losses [2m, B] (a loss without integer
    decisions): as estimate.py (a NaN d or an Inf loss compares false, like a tie, and gives 0), but relative to
    at least 1: one example's loss near 0 comes from a log-sum-exp near log(1), known to ~2^-23 there, so the
    runtime's and another's rounding could give two tiny losses either order."""
    F = b.f32
    plus = F.Slice(per, np.array([0], np.int64), np.array([m], np.int64), np.array([0], np.int64))
    minus = F.Slice(per, np.array([m], np.int64), np.array([2 * m], np.int64), np.array([0], np.int64))
    d = F.Sub(plus, minus, hint="d")
    scale = F.Max(F.Max(F.Abs(plus), F.Abs(minus)), np.float32(1.0))
    informative = b.op("Greater", [F.Abs(d), F.Mul(scale, TIE_TOLERANCE)], dtype=bool)
    return b.cast(F.Sign(F.Where(informative, d, 0.0)), np.int32, hint="c")


def exact_gradient(b: Builder, layer: NodeLayer, logits, labels, loss: str):
    """(V, ĝ) of the layer that writes the logits, from their clean value [B, ..., out] (passes/head.py):
    V = QuantizeLinear(softmax(z) − onehot(y), 2^-7) (bce: sigmoid(z) − y), int8; ĝ = layer_gradient's / 2^G_SHIFT."""
    v, rows = _exact_rows(b, logits, labels, loss)
    return v, _shifted(b, layer_gradient(b, layer, rows), G_SHIFT)


def _exact_rows(b: Builder, logits, labels, loss: str):
    """(V [B, ..., out], its int8 rows [rows, out]) of the output layer from its clean logits."""
    F = b.f32
    if integer_loss.applies(loss, logits.shape[-1]) and len(logits.shape) == 2 and len(labels.shape) == 1:
        v = (integer_loss.softmax_error if loss == "ce" else integer_loss.sigmoid_error)(b, logits, labels)
        return v, v
    if loss == "ce":    # onehot as labels == 0..C−1 (the ONNX reference evaluator cannot run OneHot with these types)
        hit = b.op("Equal", [b.op("Unsqueeze", [labels, np.array([1], np.int64)], dtype=np.int64),
                             np.arange(logits.shape[-1], dtype=np.int64)], dtype=bool)
        target, p = b.cast(hit, np.float32), F.Softmax(logits, axis=-1)
    else:
        target = b.cast(labels if len(labels.shape) == 2 else b.op("Unsqueeze", [labels, np.array([1], np.int64)],
                                                                    dtype=np.int64), np.float32)
        p = F.Sigmoid(logits)
    v = b.op("QuantizeLinear", [F.Sub(p, target, hint="e"), V_SCALE, np.int8(0)], dtype=np.int8, hint="v")
    return v, b.op("Reshape", [v, np.array([-1, logits.shape[-1]], np.int64)], dtype=np.int8)    # [rows, out]


PAIR = Pass("node", run, reads=("io", "plan", "trainables", "state", "perturbations"), adds=("branches", "node"))
ESTIMATE = Pass("node estimate", estimate, reads=("plan", "trainables", "branches", "losses", "node"),
                adds=("estimate",))
