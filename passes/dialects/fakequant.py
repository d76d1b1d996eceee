"""fakequant: a float weight initializer quantized in-graph (W → QuantizeLinear → DequantizeLinear, as
torch fake-quant/QAT, AIMET and TensorRT-style explicit-quantization exports write it) becomes the integer
initializer that QuantizeLinear computes:

    W_q = saturate(round_half_even(W / s) + zp)        (ONNX QuantizeLinear, per tensor or per axis)

with the dtype of zp (uint8 when zp is absent). tests/passes/test_dialects.py checks W_q against
onnxruntime's QuantizeLinear bit for bit.

Precondition: any graph.  Postcondition: each QuantizeLinear whose input, scale and zero point are
constants and whose output feeds only DequantizeLinear nodes is gone; those DequantizeLinear nodes read
an integer initializer named after the float weight (`<W>_quantized`). Blocked (block_size) and
float8 quantization are left as they are. Returns how many were folded.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def quantize(w: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
    dtype = zp.dtype if zp is not None else np.dtype(np.uint8)
    shape = [1] * w.ndim
    if scale.size > 1:
        shape[axis % w.ndim] = scale.size
    s = scale.astype(np.float32).reshape(shape if scale.size > 1 else ())
    z = (zp.astype(np.int64).reshape(shape if zp.size > 1 else ()) if zp is not None else 0)
    q = np.rint(w.astype(np.float32) / s).astype(np.int64) + z  # np.rint rounds half to even
    info = np.iinfo(dtype)
    return np.clip(q, info.min, info.max).astype(dtype)


def _foldable(node: gs.Node) -> bool:
    ins = [t for t in node.inputs if t.name]
    if node.op != "QuantizeLinear" or not all(isinstance(t, gs.Constant) for t in ins):
        return False
    if node.attrs.get("block_size", 0) or "output_dtype" in node.attrs and len(ins) < 3:
        return False
    zp = ins[2].values if len(ins) > 2 else None
    return (ins[0].values.dtype == np.float32 and (zp is None or np.issubdtype(zp.dtype, np.integer))
            and all(u.op == "DequantizeLinear" for u in node.outputs[0].outputs))


def run(graph: gs.Graph) -> int:
    folded, taken = 0, set(graph.tensors())
    for node in list(graph.nodes):
        if not _foldable(node):
            continue
        w, scale = node.inputs[0], node.inputs[1]
        zp = node.inputs[2].values if len(node.inputs) > 2 and node.inputs[2].name else None
        values = quantize(w.values, np.asarray(scale.values), None if zp is None else np.asarray(zp),
                          int(node.attrs.get("axis", 1)))
        name = f"{w.name}_quantized"
        while name in taken:
            name += "_"
        taken.add(name)
        q = gs.Constant(name, values)
        for dq in list(node.outputs[0].outputs):
            dq.inputs[0] = q
        node.outputs = []
        folded += 1
    graph.cleanup()
    return folded
