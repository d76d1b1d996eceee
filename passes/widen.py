"""widen: move trained weights to their training grid (fgcompile/grid.py): finer (--bits 16 on 8-bit
weights) and with H times the pretrained range (--headroom H, symmetric weights).

    W_t = F · W,   s_t = s / F,   zp_t = F · zp     (so DQ(W_t) = (W_t − zp_t)·s_t == DQ(W) exactly)
    b' = F · b,    s_b' = s_b / F                    (F > 1: the site's int32 bias keeps s_b = s_in · s_w)

Dividing a float32 scale by a power of two is exact, so the widened graph computes the same function bit
for bit (an int16 weight with headroom trains on a coarser grid, F = 1/H, and moves by at most half a
grid LSB). int8 widens to int16, uint8 (asymmetric weights, no headroom) to uint16. F and the range per case
are in fgcompile/grid.py; export narrows back (runtime/export.py); the source keeps zp.

Precondition: ctx.trainables from select.
Postcondition: the graph is at opset >= 21 when some grid changes (int16 DequantizeLinear); each trainable
weight whose grid changes has the grid's dtype, the scaled scale and zero point; the int32 bias of its
site is scaled with it; an 8-bit Add bias (MatMul + Add) widens by 256 on its own grid (no headroom);
every trainable's qmin/qmax/stride/factor describe its grid.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fgcompile.errors import CompileError
from fgcompile.grid import training_grid, widen as _times   # W_t = F·W; export narrows with grid.narrow
from . import opset
from .context import Context, Pass
from .formulas import bias_stride


def _replace_input(node: gs.Node, index: int, values: np.ndarray, name: str, tensors: dict | None = None) -> None:
    """Feed NODE's input INDEX a constant NAME of VALUES: the graph's own when it already has one of that
    name and value (a scale or zero point shared by several widened weights, as tf2onnx writes them; a
    second constant of the same name makes onnx-graphsurgeon warn once per reader), else a new one."""
    values = np.asarray(values)   # 0-d arithmetic yields numpy scalars
    have = (tensors or {}).get(name)
    same = isinstance(have, gs.Constant) and have.values.dtype == values.dtype and np.array_equal(have.values, values)
    node.inputs[index] = have if same else gs.Constant(name, values)


def _scale(graph: gs.Graph, tensor, new_dtype, factor: float) -> None:
    """Multiply an initializer and its zero point by F (rounding when F < 1) and divide its DQ scale by F
    (new constants; shared ones stay)."""
    tensors = graph.tensors()
    dq = next(n for n in graph.nodes if n.name == tensor.dq_node)
    w = _times(tensors[tensor.name].values, factor)
    info = np.iinfo(new_dtype)
    if w.min() < info.min or w.max() > info.max:
        raise CompileError(f"tensor {tensor.name!r}: widening by {factor:g} overflows {np.dtype(new_dtype).name}; "
                           "train it with --bits 8 --headroom 1.")
    suffix = f"__x{factor:g}" if np.dtype(new_dtype).name == tensor.dtype else f"__{np.dtype(new_dtype).name}"
    _replace_input(dq, 0, w.astype(new_dtype), tensor.name)
    scale = np.asarray(tensors[tensor.scale_name].values, np.float32) / np.float32(factor)
    _replace_input(dq, 1, scale, f"{tensor.scale_name}{suffix}", tensors)
    if len(dq.inputs) > 2:
        _replace_input(dq, 2, _times(dq.inputs[2].values, factor).astype(new_dtype), f"{tensor.zero_point_name}{suffix}",
                       tensors)
    tensor.dtype = np.dtype(new_dtype).name
    tensor.scale_name = f"{tensor.scale_name}{suffix}"
    tensor.zero_point_name = f"{tensor.zero_point_name}{suffix}" if len(dq.inputs) > 2 else None


def _grid(ctx: Context, t):
    """The training grid of a weight, or of an 8-bit Add bias (finer only), else None."""
    if t.role == "weight":
        return training_grid(t.tensor.dtype, ctx.spec.bits, ctx.spec.headroom)
    return training_grid(t.tensor.dtype, ctx.spec.bits, 1) if t.tensor.dtype in ("int8", "uint8") else None


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    if graph.opset < opset.WIDE_OPSET and any(_grid(ctx, t) is not None for t in ctx.trainables):
        graph = opset.imported(gs.export_onnx(graph), opset.WIDE_OPSET)   # only then: keep the model's opset
    sites = {s.name: s for s in ctx.io.sites}
    for t in ctx.trainables:
        grid = _grid(ctx, t)
        if grid is None:
            continue
        if graph.opset < 21:
            raise CompileError(f"training {t.name!r} on {grid.dtype} needs opset 21 DequantizeLinear; the model "
                               f"is opset {graph.opset}. Re-export at opset 21 or compile with --bits 8 --headroom 1.")
        dq = next(n for n in graph.nodes if n.name == t.tensor.dq_node)
        if grid.factor < 1 and len(dq.inputs) > 2 and np.any(dq.inputs[2].values != 0):
            raise CompileError(f"tensor {t.name!r} has a nonzero zero point; headroom needs symmetric 16-bit "
                               "weights. Compile with --headroom 1.")
        site = sites[t.site]
        _scale(graph, t.tensor, np.dtype(grid.dtype), grid.factor)
        t.widened, t.factor, (t.qmin, t.qmax) = True, grid.factor, (grid.qmin, grid.qmax)
        if t.role == "weight" and site.bias is not None and site.bias.dtype == "int32" \
                and site.bias.float_grid is None and grid.factor > 1:  # a float bias keeps its own grid
            _scale(graph, site.bias, np.int32, grid.factor)
    factors = {t.site: t.factor for t in ctx.trainables if t.role == "weight"}
    for t in ctx.trainables:  # int32 biases follow their weight's final scale
        if t.role == "bias" and t.tensor.dtype == "int32" and t.tensor.float_grid is None:
            t.factor = max(factors.get(t.site, 1), 1)   # F < 1 leaves the bias as it is
            t.widened = t.factor > 1
            tensors = graph.tensors()
            t.stride = bias_stride(tensors[sites[t.site].weight.scale_name].values, tensors[t.tensor.scale_name].values)
    return graph


PASS = Pass("widen", run, reads=("io", "trainables"))
