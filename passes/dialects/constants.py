"""constants: weights, scales and zero points written as Constant nodes, or read through Identity nodes,
become the initializers the other dialects and analyze read.

    Constant(value = T) → y                  ⇒  initializer y = T
    Identity(c) → y,  c an initializer       ⇒  y's readers read c (the Identity goes)

Some exporters write every weight as a Constant node, and TorchScript's export reads one deduplicated
initializer (a zero point shared by many layers) through an Identity per use. Readers are pointed at the
shared initializer rather than given copies, so a tied weight stays tied (select refuses to train it)
and a shared scale or zero point stays one tensor.

Runs on the ModelProto, first, so lowbit sees 4-bit Constant weights as initializers too.
Precondition: a ModelProto.  Postcondition: the same function; in the main graph no Constant node holds
a numeric tensor (`value`, `value_float(s)`, `value_int(s)`) and no Identity reads an initializer,
except where the node's output is a graph output or is read inside a subgraph by name (both kept as
they are). Returns how many Constant and Identity nodes went.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

SCALARS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}


def _tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The numeric tensor a Constant node holds, named as its output, else None (strings, sparse)."""
    if len(node.attribute) != 1:
        return None
    a = node.attribute[0]
    if a.name == "value":
        t = onnx.TensorProto()
        t.CopyFrom(a.t)
        t.name = node.output[0]
        return t if t.data_type != onnx.TensorProto.STRING else None
    if a.name in SCALARS:
        return numpy_helper.from_array(np.asarray(helper.get_attribute_value(a), SCALARS[a.name]), node.output[0])
    return None


def _subgraph_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name that a node inside a subgraph of `graph` reads (an outer-scope name among them)."""
    names = set()
    for node in graph.node:
        for a in node.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                names.update(i for n in g.node for i in n.input)
                names |= _subgraph_names(g)
    return names


def run(model: onnx.ModelProto) -> int:
    g = model.graph
    pinned = {o.name for o in g.output} | _subgraph_names(g)
    inits = {i.name for i in g.initializer}
    rename, kept, gone = {}, [], 0
    for node in g.node:   # topological: a Constant comes before the Identity that reads it
        node.input[:] = [rename.get(i, i) for i in node.input]
        tensor = _tensor(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if tensor is not None and node.output[0] not in pinned:
            g.initializer.append(tensor)
            inits.add(tensor.name)
        elif node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input[0] in inits \
                and node.output[0] not in pinned:
            rename[node.output[0]] = node.input[0]
        else:
            kept.append(node)
            continue
        gone += 1
    if gone:
        del g.node[:]
        g.node.extend(kept)
        # shape annotations of the names that went (a value_info of an initializer is harmless; of a
        # name that no longer exists, onnx.checker complains)
        keep = [v for v in g.value_info if v.name not in rename]
        del g.value_info[:]
        g.value_info.extend(keep)
    return gone
