"""What compile and inspect accept, checked before any pass does real work, so that their time and memory
stay bounded whatever the model declares:

    nodes       at most max_nodes() nodes (subgraphs included), and no training graph past it when the
                suffix is cloned 2m times: compile time and memory grow linearly with the node count, up to
                about 1 s and 15 MB per 1,000 nodes (chains of 49k nodes: 23-53 s and 0.66-0.71 GB on 2
                shared cores; a third of it in onnxruntime's session creation, the rest spread over
                onnx-graphsurgeon's walks, none of them quadratic)
    tensors     no tensor whose static shape needs more than max_bytes(), the cap on the arrays fgcompile
                reads from .npz files too (a 64 GiB ConstantOfShape compiles, then fails the first training step)
"""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper

from fgcompile.errors import CompileError, ModelError, SpecError

MAX_NODES = 50_000
NODES_VARIABLE = "FGCOMPILE_MAX_NODES"


def _limit(variable: str, default: int, unit: str) -> int:
    raw = os.environ.get(variable)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise SpecError(f"{variable}={raw!r}: not a positive whole number of {unit}. Set it to one, or unset it "
                        f"(default {default}).")
    return value


def max_nodes() -> int:
    """The most nodes compile builds a graph of: MAX_NODES, or FGCOMPILE_MAX_NODES."""
    return _limit(NODES_VARIABLE, MAX_NODES, "nodes")


def max_bytes() -> int:
    """The largest array fgcompile inflates or a model may declare: half the machine's memory
    (FGCOMPILE_MAX_ARRAY_BYTES overrides)."""
    try:
        half = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        half = 8 * 2 ** 30
    return _limit("FGCOMPILE_MAX_ARRAY_BYTES", half, "bytes")


def node_count(graph: onnx.GraphProto) -> int:
    """The nodes of `graph` and of every subgraph (If, Loop, Scan bodies) in it."""
    return sum(1 + sum(node_count(a.g) if a.type == onnx.AttributeProto.GRAPH else
                       sum(node_count(g) for g in a.graphs) for a in n.attribute
                       if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS))
               for n in graph.node)


def check_node_count(model: onnx.ModelProto) -> None:
    count, limit = node_count(model.graph), max_nodes()
    if count > limit:
        raise ModelError(f"the model has {count:,} nodes, over the limit of {limit:,} that bounds compile's time "
                         f"and memory (up to about 1 s and 15 MB per 1,000 nodes). Compile a smaller model, or raise "
                         f"the limit with {NODES_VARIABLE}={count}.")


def check_cloned(others: int, suffix: int, copies: int, why: str) -> None:
    """Refuse a training graph of `others` nodes plus `copies` clones (2m branches) of a `suffix`-node trained
    suffix past max_nodes()."""
    total, limit = others + suffix * copies, max_nodes()
    if total > limit:
        raise CompileError(f"cloned once per branch ({why}), the trained suffix's {suffix:,} nodes would make "
                           f"{copies} copies and a training graph of {total:,} nodes, over the limit of {limit:,} "
                           "that bounds compile's time and memory. Lower --m, train tensors nearer the output "
                           f"(--last, --train), or raise the limit with {NODES_VARIABLE}={total}.")


def check_declared_sizes(model: onnx.ModelProto) -> None:
    """Refuse a tensor whose static shape (as shape inference reads it: ConstantOfShape, Expand, Tile or
    Reshape of constants) needs more than max_bytes()."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:   # onnx.checker and onnxruntime's session, run next, say what is wrong
        return
    g = inferred.graph
    producers = {out: n for n in g.node for out in n.output}
    cap = max_bytes()
    for v in list(g.value_info) + list(g.output):   # initializers: load_model read them whole already
        name, t = v.name, v.type.tensor_type
        size = _bytes(t)
        if size is not None and size > cap:
            node = producers.get(name)
            made = f" (output of {node.op_type} {node.name!r})" if node is not None else ""
            shape = [d.dim_value for d in t.shape.dim]
            raise ModelError(f"tensor {name!r}{made} declares shape {shape} "
                             f"{helper.tensor_dtype_to_np_dtype(t.elem_type).name} ({size / 2 ** 30:.1f} GiB), more "
                             f"than this machine can hold ({cap / 2 ** 30:.1f} GiB allowed; "
                             "FGCOMPILE_MAX_ARRAY_BYTES raises the cap). Fix that shape in the model and re-export it.")


def _bytes(t: onnx.TypeProto.Tensor) -> int | None:
    """Bytes of a tensor type whose shape is fully static, else None."""
    if not t.HasField("shape") or not all(d.HasField("dim_value") for d in t.shape.dim):
        return None
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize
    except Exception:   # undefined or string elements
        return None
    return int(np.prod([d.dim_value for d in t.shape.dim], dtype=object)) * itemsize
