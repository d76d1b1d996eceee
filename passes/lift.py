"""lift: trainable initializers become state inputs of the graph.

Precondition: ctx.trainables from select (and widen); each is an initializer read by one DequantizeLinear.
Postcondition: each trainable is a graph input with the initializer's name, dtype and shape, read by
the same DequantizeLinear; ctx.state_in maps its name to that input; the initial values are returned
by `initial_state`. The graph computes the same function when fed those values.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fgcompile.errors import CompileError
from .context import Context


def initial_state(graph: gs.Graph, ctx: Context) -> dict[str, np.ndarray]:
    tensors = graph.tensors()
    return {t.name: np.asarray(tensors[t.name].values) for t in ctx.trainables}


def run(graph: gs.Graph, ctx: Context) -> tuple[gs.Graph, dict[str, np.ndarray]]:
    state = initial_state(graph, ctx)
    for t in ctx.trainables:
        values = state[t.name]
        if values.min() < t.qmin or values.max() > t.qmax:
            raise CompileError(f"tensor {t.name!r} holds values outside its trainable range "
                               f"[{t.qmin}, {t.qmax}]; it cannot train without wrapping. Leave it out of --train.")
        const = graph.tensors()[t.name]
        var = gs.Variable(t.name, dtype=values.dtype, shape=list(values.shape))
        for node in list(const.outputs):
            node.inputs[node.inputs.index(const)] = var
        graph.inputs.append(var)
        ctx.state_in[t.name] = var
    return graph, state
