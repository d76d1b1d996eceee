"""floatgrid: a float parameter that trains (a LayerNormalization/BatchNormalization scale or bias, a
float Add bias) is put on an int32 grid with a power-of-two scale:

    e = ⌈log2 max|P|⌉,  s = 2^(e − 27),  P_q = round_half_even(P / s)  (|P_q| ≤ 2^27),  P → DQ(P_q, s)
    stride = 2^12 grid units, so one perturbation/update unit is 2^(e − 15) ≈ max|P| / 2^15 (int16-like)

DQ(P_q, s) = float32(P_q)·s is exact for the initial grid (P/s of a float32 P has at most 24 significant
bits, and a rounded P_q is below 2^23; s is a power of two). So every element with |P| ≥ 2^(e−4) is
represented exactly and any other moves by at most s/2 = 2^(e−28) ≤ max|P|·2^−27
(tests/passes/test_parameter_kinds.py).
The grid leaves 8× headroom below the int32 state range ±2^30.

Precondition: ctx.trainables from select; their float32 tensors are graph initializers read by one node.
Postcondition: each such tensor is an int32 initializer of the same name read by a new DequantizeLinear
(`<name>/dq`, scale `<name>/grid`) that feeds the original consumer; its Parameter and Trainable describe
the grid (dtype int32, float_grid s, stride 2^12); ctx.source has the same rewrite (export and the
reference read it).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .context import Context, Pass

MANTISSA_SHIFT = 27
STRIDE = 1 << 12


def grid_scale(values: np.ndarray) -> np.float32:
    peak = float(np.abs(values).max()) if values.size else 0.0
    e = int(np.ceil(np.log2(peak))) if peak > 0 else 0
    return np.float32(2.0 ** (e - MANTISSA_SHIFT))


def on_grid(values: np.ndarray, scale: np.float32) -> np.ndarray:
    return np.rint(values.astype(np.float64) / np.float64(scale)).astype(np.int32)


def put_on_grid(graph: gs.Graph, name: str) -> tuple[str, str, float]:
    """Rewrite initializer `name` in place; returns (DQ node name, scale name, scale)."""
    const = graph.tensors()[name]
    consumer = const.outputs[0]
    scale = grid_scale(const.values)
    q = gs.Constant(name, on_grid(const.values, scale))
    s = gs.Constant(f"{name}/grid", np.asarray(scale, np.float32))
    out = gs.Variable(f"{name}/dq:0", dtype=np.float32, shape=list(const.values.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{name}/dq", {}, [q, s], [out]))
    consumer.inputs[[i for i, t in enumerate(consumer.inputs) if t is const][0]] = out
    return f"{name}/dq", s.name, float(scale)


def apply(model, names: list[str]):
    """The same rewrite on a ModelProto (the source that export and the reference read)."""
    graph = gs.import_onnx(model)
    for name in names:
        put_on_grid(graph, name)
    out = gs.export_onnx(graph.toposort(), do_type_check=False)
    out.ir_version = model.ir_version
    out.metadata_props.extend(model.metadata_props)
    return out


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    gridded = [t for t in ctx.trainables if t.tensor.dtype == "float32"]
    for t in gridded:
        t.tensor.dq_node, t.tensor.scale_name, t.tensor.float_grid = put_on_grid(graph, t.name)
        t.tensor.dtype, t.stride = "int32", STRIDE
    if gridded:
        ctx.source = apply(ctx.source, [t.name for t in gridded])
    graph.toposort()
    return graph


PASS = Pass("floatgrid", run, reads=("trainables", "source"))
