"""Batch chunks: a region of per-example ops computed on slices of the batch, one after another, so its
transient tensors (im2col rows, int32 accumulators, float requantizations) exist for a slice at a time.

The exact forward writes each frozen op as a chain of standard ops whose intermediates are 4-16x the bytes of
its 8-bit output (QLinearConv tiles them inside one kernel); on a real-size model at batch 32 they doubled the
inference peak. A region here is such a chain: nodes that read 8-bit activations [B, ...] and constants and
write one tensor [B, ...]. `in_chunks` slices every activation it reads along the batch, clones the chain per
slice and concatenates the slices' outputs into the original tensor. Every op in it treats examples
independently (`separable`), so the values are the same integers, bit for bit. onnxruntime runs a chain's
nodes in depth-first order from the Concat, one slice's chain after another, and frees each slice's
intermediates before the next.
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


def chunks_for(batch: int, bytes_per_example: float, cap: float) -> int:
    """How many slices keep a slice's transients under `cap` bytes at `batch` examples (at most MAX_CHUNKS)."""
    return int(min(MAX_CHUNKS, batch, max(1, np.ceil(batch * bytes_per_example / cap))))


def in_chunks(b: Builder, nodes: list[gs.Node], out: gs.Variable, chunks: int) -> bool:
    """Rewrite `nodes` (in order, writing `out` [B, ...]) as `chunks` slices of the batch; False (and nothing
    changed) when the region is not separable or reads no activation. B is the run's: slice k is
    [⌊B·k/chunks⌋, ⌊B·(k+1)/chunks⌋), empty when B < chunks (every op here takes an empty batch)."""
    made = {id(t) for n in nodes for t in n.outputs}
    outside = list({id(t): t for n in nodes for t in n.inputs
                    if isinstance(t, gs.Variable) and id(t) not in made}.values())
    if chunks < 2 or not outside or not all(map(separable, nodes)) or any(t.shape and t.shape[0] == 1 for t in outside):
        return False     # (a leading axis of 1 broadcasts: it is not the examples')
    batch = b.op("Shape", [outside[0]], {"start": 0, "end": 1}, dtype=np.int64, hint="batch")
    bound = lambda k: b.op("Div", [b.op("Mul", [batch, np.array([k], np.int64)], dtype=np.int64),
                                   np.array([chunks], np.int64)], dtype=np.int64, hint="chunk_bound")
    bounds = [bound(k) for k in range(chunks + 1)]
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        copy = {id(t): b.op("Slice", [t, lo, hi, np.array([0], np.int64)], dtype=t.dtype, hint="chunk")
                for t in outside}
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
