"""widen: train 8-bit weights at 16-bit resolution (spec.bits == 16).

    W16 = 256 · W8,  s16 = s8 / 256,  zp16 = 256 · zp8   (so DQ(W16) = (W16 − zp16)·s16 == DQ(W8) exactly)
    b' = 256 · b,    s_b' = s_b / 256                  (the site's int32 bias keeps s_b = s_in · s_w)

Dividing a float32 scale by 256 is exact, so the widened graph computes the same function bit for bit.
int8 widens to int16, uint8 (asymmetric weights) to uint16. The trained range is [-32768, 32639]
(uint16: [0, 65407]): every value narrows back to 8 bits as round(W16 / 256) without overflow (export);
the source keeps zp8.

Precondition: ctx.trainables from select; graph opset >= 21 (int16 DequantizeLinear).
Postcondition: each trainable int8/uint8 weight is int16/uint16 with the scaled scale and zero point; the bias of
its site is scaled with it; an 8-bit Add bias (MatMul + Add) widens the same way on its own grid;
every trainable's qmin/qmax/step describe its new grid.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fgcompile.errors import CompileError
from .context import Context
from .analyze import bias_step

FACTOR = 256
WIDE = {"int8": (np.int16, (-32768, 127 * FACTOR + FACTOR // 2 - 1)),
        "uint8": (np.uint16, (0, 255 * FACTOR + FACTOR // 2 - 1))}


def _replace_input(node: gs.Node, index: int, values: np.ndarray, name: str) -> None:
    node.inputs[index] = gs.Constant(name, np.asarray(values))  # 0-d arithmetic yields numpy scalars


def _scale(graph: gs.Graph, tensor, new_dtype) -> None:
    """Multiply an initializer by 256 and divide its DQ scale by 256 (new constants; shared ones stay)."""
    tensors = graph.tensors()
    dq = next(n for n in graph.nodes if n.name == tensor.dq_node)
    w = tensors[tensor.name].values.astype(np.int64) * FACTOR
    info = np.iinfo(new_dtype)
    if w.min() < info.min or w.max() > info.max:
        raise CompileError(f"tensor {tensor.name!r}: widening by 256 overflows {np.dtype(new_dtype).name}; "
                           "train it with --bits 8.")
    _replace_input(dq, 0, w.astype(new_dtype), tensor.name)
    scale = np.asarray(tensors[tensor.scale_name].values, np.float32) / np.float32(FACTOR)
    _replace_input(dq, 1, scale, f"{tensor.scale_name}__w16")
    if len(dq.inputs) > 2:
        zp = (np.asarray(dq.inputs[2].values).astype(np.int64) * FACTOR).astype(new_dtype)
        _replace_input(dq, 2, zp, f"{tensor.zero_point_name}__w16")
    tensor.dtype = np.dtype(new_dtype).name
    tensor.scale_name = f"{tensor.scale_name}__w16"
    tensor.zero_point_name = f"{tensor.zero_point_name}__w16" if len(dq.inputs) > 2 else None


def _widens(ctx: Context, t) -> bool:
    return ctx.spec.bits == 16 and t.tensor.dtype in WIDE  # 8-bit weights and 8-bit Add biases


def needed(ctx: Context) -> bool:
    """Whether run() will emit int16 DequantizeLinear (the pipeline raises the opset only then)."""
    return any(_widens(ctx, t) for t in ctx.trainables)


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    sites = {s.name: s for s in ctx.sites}
    for t in ctx.trainables:
        if not _widens(ctx, t):
            continue
        if graph.opset < 21:
            raise CompileError(f"--bits 16 needs int16 DequantizeLinear (opset 21); the model is opset "
                               f"{graph.opset}. Re-export at opset 21 or compile with --bits 8.")
        site = sites[t.site]
        wide_dtype, (t.qmin, t.qmax) = WIDE[t.tensor.dtype]
        _scale(graph, t.tensor, wide_dtype)
        t.widened = True
        if t.role == "weight" and site.bias is not None and site.bias.dtype == "int32" \
                and site.bias.float_grid is None:  # a float bias keeps its own grid
            _scale(graph, site.bias, np.int32)
    widened_sites = {t.site for t in ctx.trainables if t.widened and t.role == "weight"}
    for t in ctx.trainables:  # int32 biases follow their weight's final scale
        if t.role == "bias" and t.tensor.dtype == "int32" and t.tensor.float_grid is None:
            t.widened = t.site in widened_sites
            t.step = bias_step(graph, sites[t.site].weight.scale_name, t.tensor.scale_name)
    return graph
