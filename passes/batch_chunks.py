"""Batch chunks: a region of per-example ops computed on slices of the batch, one after another, so its
transient tensors (im2col rows, int32 accumulators, float requantizations) exist for a slice at a time.

The exact forward writes each frozen op as a chain of standard ops whose intermediates are 4-16x the bytes of
its 8-bit output (QLinearConv tiles them inside one kernel); on a real-size model at batch 32 they doubled the
inference peak. A region here is such a chain: nodes that read 8-bit activations [N, ...] and constants and
write one tensor [N, ...], N the batch (or a stacked suffix's branches × batch, or its branch axis). `in_chunks`
slices every activation of the output's rank along that leading axis (one of lower rank broadcasts: every
slice reads it whole), clones the chain per slice and concatenates the slices' outputs into the original
tensor. Every op in it treats examples independently (`separable`), so the values are the same integers,
bit for bit. onnxruntime runs a chain's nodes in depth-first order from the Concat, one slice's chain after
another, and frees each slice's intermediates before the next.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .graph_ops import Builder

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Mod", "Cast", "Clip", "Floor", "Sqrt", "Less", "LessOrEqual", "Greater",
               "GreaterOrEqual", "Equal", "Where", "Identity", "QuantizeLinear", "DequantizeLinear", "Max", "Min",
               "MaxPool", "Conv", "ConvInteger", "MatMul", "MatMulInteger"}   # the last: batch is not reduced
AXIS_OPS = {"Gather": "axis", "Split": "axis", "Concat": "axis", "Softmax": "axis"}
REDUCTIONS = {"ReduceSum", "ReduceMax", "ReduceMin", "ReduceMean"}
MAX_CHUNKS = 64    # slices per region (a stacked suffix's 2m·B examples need this many; a plain batch 2-8)


def separable(node: gs.Node) -> bool:
    """True when the node computes each example of its leading axis from that example alone."""
    op = node.op
    if op in ELEMENTWISE:
        return True
    if op in AXIS_OPS:
        return node.attrs.get(AXIS_OPS[op], 0) != 0 or op == "Gather" and isinstance(node.inputs[0], gs.Constant)
    if op == "Transpose":
        return list(node.attrs.get("perm", [0]))[:1] == [0]
    constant = lambda k: node.inputs[k].values if len(node.inputs) > k and isinstance(node.inputs[k], gs.Constant) \
        else None
    if op == "Reshape":           # [0 or -1, ...]: the leading axis stays the examples' (or their rows', in order)
        shape = constant(1)
        return shape is not None and shape.size > 0 and int(shape[0]) in (0, -1) and list(shape).count(-1) <= 1
    if op == "Pad":
        pads = constant(1)
        return pads is not None and pads[0] == 0 and pads[pads.size // 2] == 0
    if op in REDUCTIONS | {"Slice"}:
        axes = constant(3 if op == "Slice" else 1)
        rank = len(node.inputs[0].shape) if node.inputs[0].shape else None
        return axes is not None and all(a > 0 or rank and a % rank != 0 for a in map(int, axes.ravel()))
    return False


SAME_RANK = ELEMENTWISE | {"Relu", "Concat", "Slice", "Transpose", "Pad", "Split", "AveragePool"}


def rank_of(t: gs.Tensor, depth: int = 64) -> int | None:
    """t's rank: its shape's, else its producer's where that op keeps its inputs' rank (the branch stacking
    leaves the suffix's tensors without shapes), else None."""
    if t.shape is not None:
        return len(t.shape)
    node = t.inputs[0] if len(t.inputs) == 1 else None
    if node is None or depth == 0:
        return None
    if node.op == "Reshape" and isinstance(node.inputs[1], gs.Constant):
        return int(node.inputs[1].values.size)
    if node.op not in SAME_RANK:
        return None
    # the data inputs (not a Slice's bounds, nor an omitted optional input, named "")
    data = node.inputs[:1] if node.op in ("Slice", "Pad", "Split") else [i for i in node.inputs if i.name]
    ranks = [rank_of(i, depth - 1) if isinstance(i, gs.Variable) else len(i.shape) for i in data]
    return None if not ranks or None in ranks else max(ranks)


def chunks_for(leading: int, bytes_per_item: float, cap: float) -> int:
    """How many slices of a leading axis of `leading` items keep a slice's transients under `cap` bytes (at most
    MAX_CHUNKS)."""
    return int(min(MAX_CHUNKS, leading, max(1, np.ceil(leading * bytes_per_item / cap))))


def in_chunks(b: Builder, nodes: list[gs.Node], out: gs.Variable, chunks: int) -> bool:
    """Rewrite `nodes` (in order, writing `out` [B, ...]) as `chunks` slices of the batch; False (and nothing
    changed) when the region is not separable or reads no activation. B is the run's: slice k is
    [⌊B·k/chunks⌋, ⌊B·(k+1)/chunks⌋), empty when B < chunks (every op here takes an empty batch)."""
    made = {id(t) for n in nodes for t in n.outputs}
    outside = list({id(t): t for n in nodes for t in n.inputs
                    if isinstance(t, gs.Variable) and id(t) not in made}.values())
    rank, ranks = len(out.shape) if out.shape else None, [rank_of(t) for t in outside]
    if chunks < 2 or rank is None or any(r is None or r > rank for r in ranks) or not all(map(separable, nodes)):
        return False     # (without every input's rank, which of them carry the examples' axis is unknown)
    # an input of lower rank, or with a leading axis of 1, broadcasts over the examples: every slice reads it whole
    sliced = [t for t, r in zip(outside, ranks) if r == rank and not (t.shape and t.shape[0] == 1)]
    if not sliced:
        return False
    batch = b.op("Shape", [sliced[0]], {"start": 0, "end": 1}, dtype=np.int64, hint="batch")
    bound = lambda k: b.op("Div", [b.op("Mul", [batch, np.array([k], np.int64)], dtype=np.int64),
                                   np.array([chunks], np.int64)], dtype=np.int64, hint="chunk_bound")
    bounds = [bound(k) for k in range(chunks + 1)]
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        copy = {id(t): b.rows(t, lo, hi) for t in sliced}
        for n in nodes:
            outputs = [gs.Variable(b.name("chunk"), dtype=t.dtype) for t in n.outputs]
            ins = [copy.get(id(t), t) for t in n.inputs]
            copy.update({id(t): o for t, o in zip(n.outputs, outputs)})
            b.graph.nodes.append(gs.Node(n.op, b.name(n.op.lower()), dict(n.attrs), ins, outputs))
        parts.append(copy[id(out)])
    gone = {id(n) for n in nodes}
    for n in nodes:
        n.inputs.clear()
        n.outputs.clear()
    b.graph.nodes[:] = [n for n in b.graph.nodes if id(n) not in gone]
    b.graph.nodes.append(gs.Node("Concat", b.name("chunks"), {"axis": 0}, parts, [out]))
    return True
