"""analyze: find the QDQ weight sites of an inference graph, and its normalization parameters.

A weight site (kind "product") is an integer initializer W feeding a DequantizeLinear whose output feeds
a Conv, Gemm or MatMul as its weight (input 1). Its bias is the integer initializer that reaches the
same node's input 2 (Conv/Gemm) or, for MatMul, the other input of the single Add that consumes the
MatMul's (requantized, or dynamically rescaled) output, through its own DequantizeLinear, or a float
initializer there.
A normalization site (kind "norm") is a LayerNormalization or BatchNormalization whose scale and bias
are initializers, quantized (through DequantizeLinear) or float. Float parameters are put on an
integer grid by passes/floatgrid.py when they train.

Precondition: an ONNX graph (gs.Graph) of opset >= 13.
Postcondition: the graph is unchanged (but topologically sorted); ctx.io holds the data inputs, the
output, its head and loss tap (fgcompile/heads.py) and the sites in topological order of their consumers.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fgcompile import heads
from fgcompile.errors import CompileError, ModelError
from .context import ModelIO, Parameter, Pass, WeightSite

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
PROMPT_NODE = "fgcompile/prompt/expand"   # passes/prompts.py's Expand of the prompt tokens
INT_DTYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32)


def _dq_initializer(tensor: gs.Tensor) -> tuple[gs.Node, gs.Constant] | None:
    """(DequantizeLinear node, integer initializer) when `tensor` is DQ(initializer), else None."""
    if not tensor.inputs:
        return None
    dq = tensor.inputs[0]
    if dq.op != "DequantizeLinear" or not isinstance(dq.inputs[0], gs.Constant):
        return None
    if dq.inputs[0].values.dtype.type not in INT_DTYPES:
        return None
    return dq, dq.inputs[0]


def _describe(dq: gs.Node, w: gs.Constant) -> Parameter:
    scale = dq.inputs[1]
    zp = dq.inputs[2] if len(dq.inputs) > 2 else None
    per_channel = isinstance(scale, gs.Constant) and scale.values.size > 1
    axis = int(dq.attrs.get("axis", 1)) % max(w.values.ndim, 1) if per_channel else None
    return Parameter(w.name, dq.name, str(w.values.dtype), tuple(int(d) for d in w.values.shape), axis,
                  scale.name, zp.name if zp is not None else None)


def _parameter(tensor: gs.Tensor) -> Parameter | None:
    """A quantized parameter DQ(integer initializer), or a float32 initializer, else None."""
    found = _dq_initializer(tensor)
    if found:
        return _describe(*found)
    if isinstance(tensor, gs.Constant) and tensor.values.dtype == np.float32:
        return Parameter(tensor.name, "", "float32", tuple(int(d) for d in tensor.values.shape), None, "", None)
    return None


def _matmul_bias(node: gs.Node) -> Parameter | None:
    """The Add bias after a MatMul, skipping a Q → DQ pair (quantize_static) or the Mul by s_a·s_W
    (quantize_dynamic, after passes/dialects/dynamic.py) on the way."""
    out = node.outputs[0]
    for _ in range(3):
        if len(out.outputs) != 1:
            return None
        nxt = out.outputs[0]
        if nxt.op == "Add":
            other = [t for t in nxt.inputs if t is not out]
            return _parameter(other[0]) if len(other) == 1 else None
        if nxt.op not in ("QuantizeLinear", "DequantizeLinear", "Mul"):
            return None
        out = nxt.outputs[0]
    return None


NORM_OPS = ("LayerNormalization", "BatchNormalization")


def _norm_site(node: gs.Node) -> WeightSite | None:
    if node.op not in NORM_OPS or len(node.inputs) < 2:
        return None
    scale = _parameter(node.inputs[1])
    bias = _parameter(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    return WeightSite(node.name, node.op, scale, bias, "norm") if scale else None


def find_weight_sites(graph: gs.Graph) -> list[WeightSite]:
    graph.toposort()
    sites = []
    for node in graph.nodes:
        norm = _norm_site(node)
        if norm:
            sites.append(norm)
        if node.name == PROMPT_NODE and isinstance(node.inputs[0], gs.Constant):
            sites.append(WeightSite(node.name, node.op, _parameter(node.inputs[0]), None, "prompt"))
        if node.op not in WEIGHT_OPS or len(node.inputs) < 2:
            continue
        found = _dq_initializer(node.inputs[1])
        if found is None:
            continue
        bias = None
        if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2].name:
            bias = _parameter(node.inputs[2])
        elif node.op == "MatMul":
            bias = _matmul_bias(node)
        sites.append(WeightSite(node.name, node.op, _describe(*found), bias))
    return sites


QUANTIZED_OPS = ("DequantizeLinear", "QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger",
                 "DynamicQuantizeLinear")


def is_quantized(graph: gs.Graph) -> bool:
    """Any quantized op at all (a dialect analyze cannot train still gets its pattern named)."""
    return any(n.op in QUANTIZED_OPS for n in graph.nodes)


def check_quantized(graph: gs.Graph) -> None:
    """ModelError unless the graph holds a quantized op; it names the If/Loop/Scan nodes whose branches
    hold the layers, which quantize_static leaves float (it does not quantize inside subgraphs)."""
    if is_quantized(graph):
        return
    nested = [n.name for n in graph.nodes if any(_holds_products(g) for g in _subgraphs(n))]
    where = (f" Its layers sit inside the branches of {', '.join(repr(n) for n in nested[:3])} "
             "(If/Loop/Scan), which quantize_static does not quantize: "
             "export the model with the branch taken (e.g. a fixed sample rate), then quantize it."
             if nested else "")
    raise ModelError("the model is not quantized (no DequantizeLinear node): fgcompile trains QDQ inference "
                     "graphs. Quantize it first, e.g. onnxruntime.quantization.quantize_static(..., "
                     f"quant_format=QuantFormat.QDQ).{where}")


def _subgraphs(node: gs.Node) -> list[gs.Graph]:
    return [v for v in node.attrs.values() if isinstance(v, gs.Graph)]


def _holds_products(graph: gs.Graph) -> bool:
    return any(n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") or any(_holds_products(g) for g in _subgraphs(n))
               for n in graph.nodes)


def head(graph: gs.Graph) -> heads.Head:
    """The output's head and the tensor the loss reads (fgcompile/heads.py): the model output, or the float
    tensor before a trailing QuantizeLinear -> DequantizeLinear on it (a Sigmoid head: its logit). An 8-bit
    grid on the logits hides the loss change of a ±ε·z step (every pair ties), so training reads the last
    layer's output before requantization."""
    tensors = graph.tensors()

    def producer(name):
        t = tensors.get(name)
        node = t.inputs[0] if t is not None and t.inputs else None
        return None if node is None else (node.op, [i.name for i in node.inputs], len(t.outputs))
    return heads.read_head(graph.outputs[0].name, producer)


def run(graph: gs.Graph, ctx) -> gs.Graph:
    """Fill ctx.io (data inputs, output, loss tap, sites), or raise on a graph fgcompile cannot train."""
    check_quantized(graph)
    data = [t for t in graph.inputs if not isinstance(t, gs.Constant)]
    if not data:
        raise CompileError("the model has no data input.")
    if not graph.outputs:
        raise CompileError("the model has no outputs.")
    output = graph.outputs[0].name
    for t in data:
        kind = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
        if not (np.issubdtype(kind, np.floating) or np.issubdtype(kind, np.integer)):
            raise CompileError(f"the model's input {t.name!r} is {kind.name}; fgcompile feeds float or "
                               "integer (e.g. token id) data. Export the model with numeric inputs.")
    out_shape = graph.outputs[0].shape
    if out_shape is not None and len(out_shape) != 2:
        raise CompileError(f"output {output!r} has shape {out_shape}; fgcompile needs class scores "
                           "shaped [batch, classes] for its loss.")
    found = head(graph)
    classes = out_shape[-1] if out_shape and isinstance(out_shape[-1], int) else None
    heads.check_classes(found.kind, classes, output)
    sites = find_weight_sites(graph)
    if not any(s.kind == "product" for s in sites):
        from .dialects.unsupported import explain
        raise CompileError(explain(graph))
    ctx.io = ModelIO([t.name for t in data], output, found.tap, sites, found.kind, classes)
    return graph


PASS = Pass("analyze", run, adds=("io",))
