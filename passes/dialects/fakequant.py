"""fakequant: a float weight initializer quantized in-graph (W → QuantizeLinear → DequantizeLinear, as
torch fake-quant/QAT, AIMET and TensorRT-style explicit-quantization exports write it) becomes the integer
initializer that QuantizeLinear computes:

    W_q = saturate(round_half_even(W / s) + zp)        (ONNX QuantizeLinear, per tensor or per axis)

with the dtype of zp (uint8 when zp is absent). tests/passes/test_dialects.py checks W_q against
onnxruntime's QuantizeLinear bit for bit.

Precondition: any graph.  Postcondition: each QuantizeLinear whose input, scale and zero point are
constants and whose output feeds only DequantizeLinear nodes is gone; those DequantizeLinear nodes read
an integer initializer named after the float weight (`<W>_quantized`). What cannot fold exactly (block or
float8 quantization, a float16 weight, a computed scale) is left as it is; `unfoldable` says why, for
passes/dialects/unsupported.py. Returns how many were folded.
"""
from __future__ import annotations

import numpy as np
import onnx
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


def _grid(node: gs.Node) -> np.dtype:
    """What a QuantizeLinear writes: its zero point's dtype, else output_dtype's, else uint8."""
    if len(node.inputs) > 2 and node.inputs[2].name:
        return np.dtype(node.inputs[2].values.dtype)
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs.get("output_dtype", onnx.TensorProto.UINT8)))


def unfoldable(node: gs.Node) -> str | None:
    """Why the QuantizeLinear `node` cannot be folded into an integer initializer, or None when it can."""
    ins = [t for t in node.inputs if t.name]
    computed = [what for what, t in zip(("its input", "its scale", "its zero point"), ins)
                if not isinstance(t, gs.Constant)]
    if computed:
        return f"{' and '.join(computed)} {'is' if len(computed) == 1 else 'are'} computed in the graph, not stored"
    if node.attrs.get("block_size", 0):
        return f"block quantization, block_size {node.attrs['block_size']}: scales vary inside a channel"
    if not np.issubdtype(_grid(node), np.integer):
        return f"quantization to {_grid(node).name}, a float grid fgcompile does not train"
    if ins[0].values.dtype != np.float32:
        return f"a {ins[0].values.dtype.name} weight: fgcompile folds float32 weights only"
    others = sorted({u.op for u in node.outputs[0].outputs if u.op != "DequantizeLinear"})
    if others:
        return f"its output also feeds {', '.join(others)}, not only DequantizeLinear"
    return None


def run(graph: gs.Graph) -> int:
    folded, taken = 0, set(graph.tensors())
    for node in list(graph.nodes):
        if node.op != "QuantizeLinear" or unfoldable(node):
            continue
        w, scale = node.inputs[0], node.inputs[1]
        zp = node.inputs[2].values if len(node.inputs) > 2 and node.inputs[2].name else np.zeros((), _grid(node))
        values = quantize(w.values, np.asarray(scale.values), np.asarray(zp), int(node.attrs.get("axis", 1)))
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
