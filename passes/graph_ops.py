"""Graph-building helpers shared by every pass: constants, single ops, int32 clip, subgraph clone.

All helpers build onnx-graphsurgeon nodes in place on a gs.Graph. Names are deterministic (prefix +
counter) so that two compilations of the same model with the same spec produce identical files.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

NP_DTYPE = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16,
            "int32": np.int32, "uint32": np.uint32, "int64": np.int64, "float32": np.float32, "bool": bool}


def onnx_dtype(np_dtype) -> int:
    from onnx import helper
    return helper.np_dtype_to_tensor_dtype(np.dtype(np_dtype))


class Builder:
    """Adds nodes to `graph` with unique names under `prefix`."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph, self.prefix, self.count = graph, prefix, 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}/{hint}_{self.count}"

    def const(self, array, hint: str = "const") -> gs.Constant:
        return gs.Constant(self.name(hint), np.asarray(array))

    def op(self, op_type: str, inputs, attrs=None, dtype=None, shape=None, hint=None, outputs=1):
        """One node; numpy inputs become constants. Returns its output Variable (or a list)."""
        ins = [x if isinstance(x, gs.Tensor) else self.const(x) for x in inputs]
        name = self.name(hint or op_type.lower())
        outs = [gs.Variable(f"{name}:{k}", dtype=dtype, shape=shape) for k in range(outputs)]
        self.graph.nodes.append(gs.Node(op_type, name, attrs or {}, ins, outs))
        return outs[0] if outputs == 1 else outs

    def cast(self, x, np_dtype, hint="cast"):
        return self.op("Cast", [x], {"to": onnx_dtype(np_dtype)}, dtype=np.dtype(np_dtype), hint=hint)

    def clip_int32(self, x, lo: int, hi: int, hint="clip"):
        """Saturate an int32 tensor to [lo, hi] (int16 has no Clip in onnxruntime; int32 does)."""
        return self.op("Clip", [x, np.array(lo, np.int32), np.array(hi, np.int32)], dtype=np.int32, hint=hint)


def optional_input(node: gs.Node, k: int):
    """Input k, or None when absent (past the end, or the empty name of an omitted optional input)."""
    return node.inputs[k] if k < len(node.inputs) and node.inputs[k].name else None


def producer(tensor: gs.Tensor):
    return tensor.inputs[0] if tensor.inputs else None


def downstream_nodes(graph: gs.Graph, start: list[gs.Tensor]) -> list[gs.Node]:
    """Every node that depends on any tensor in `start`, in graph order."""
    seen, stack = set(), list(start)
    while stack:
        t = stack.pop()
        for node in t.outputs:
            if id(node) not in seen:
                seen.add(id(node))
                stack.extend(node.outputs)
    return [n for n in graph.nodes if id(n) in seen]


def clone_nodes(graph: gs.Graph, nodes: list[gs.Node], replace: dict, suffix: str) -> dict:
    """Copy `nodes` into `graph`; inputs found in `replace` (by tensor name) are substituted and
    every produced tensor gets `suffix`. Returns the map original name -> cloned tensor."""
    mapping = dict(replace)
    for node in nodes:
        ins = [mapping.get(t.name, t) for t in node.inputs]
        outs = []
        for t in node.outputs:
            new = gs.Variable(t.name + suffix, dtype=t.dtype, shape=t.shape)
            mapping[t.name] = new
            outs.append(new)
        graph.nodes.append(gs.Node(node.op, node.name + suffix, dict(node.attrs), ins, outs,
                                   domain=node.domain))
    return mapping
