"""lift: trainable initializers become state inputs of the graph.

Precondition: ctx.trainables from select (and widen); each is an initializer read by one DequantizeLinear.
Postcondition: each trainable is a graph input with the initializer's name, dtype and shape, read by
the same DequantizeLinear; ctx.state maps its name to that input and to its initial value. The graph
computes the same function when fed those values.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fgcompile.errors import CompileError
from .context import Context, Pass, State


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    tensors = graph.tensors()
    ctx.state = State({}, {})
    for t in ctx.trainables:
        const = tensors[t.name]
        values = np.asarray(const.values)
        if values.min() < t.qmin or values.max() > t.qmax:
            raise CompileError(f"tensor {t.name!r} holds values outside its trainable range "
                               f"[{t.qmin}, {t.qmax}]; it cannot train without wrapping. Leave it out of --train.")
        var = gs.Variable(t.name, dtype=values.dtype, shape=list(values.shape))
        for node in list(const.outputs):
            node.inputs[node.inputs.index(const)] = var
        graph.inputs.append(var)
        ctx.state.inputs[t.name], ctx.state.initial[t.name] = var, values
    return graph


PASS = Pass("lift", run, reads=("trainables",), adds=("state",))
