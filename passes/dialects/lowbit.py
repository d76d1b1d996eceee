"""lowbit: 4-bit weights. Per-tensor and per-channel int4/uint4 DequantizeLinear initializers become
int8/uint8 with the same values, scale and zero point (DQ(W4) == DQ(int8(W4)) exactly), so they train
like int8 weights (on 16 bits with --bits 16) and export as int8. Block-quantized weights
(DequantizeLinear with block_size, com.microsoft MatMulNBits) are refused: their scales vary inside a
channel, which the training grid does not represent.

Runs on the ModelProto (graphsurgeon has no int4 arrays).
Precondition: a ModelProto.  Postcondition: no DequantizeLinear reads an int4/uint4 initializer; the
model holds no block-quantized weight, else CompileError names the node. Returns how many were widened.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from fgcompile.errors import CompileError

FOUR_BIT = {onnx.TensorProto.INT4: np.int8, onnx.TensorProto.UINT4: np.uint8}
BLOCK_FIX = ("Re-export the weights per channel (e.g. onnxruntime.quantization.quantize_static with "
             "QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8 or QInt4 without block size).")


def run(model: onnx.ModelProto) -> int:
    inits = {i.name: i for i in model.graph.initializer}
    widened = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            raise CompileError(f"node {node.name!r} is MatMulNBits (com.microsoft): {_attr(node, 'bits', 4)}-bit "
                               f"weights packed in blocks of {_attr(node, 'block_size', '?')}, an inference-only "
                               f"format fgcompile cannot train. {BLOCK_FIX}")
        if node.op_type != "DequantizeLinear":
            continue
        if _attr(node, "block_size", 0):
            raise CompileError(f"node {node.name!r} is a block-quantized DequantizeLinear (block_size "
                               f"{_attr(node, 'block_size', 0)}): scales vary inside a channel, which fgcompile "
                               f"cannot train. {BLOCK_FIX}")
        for name in node.input[:3:2]:  # the weight and its zero point
            t = inits.get(name)
            if t is not None and t.data_type in FOUR_BIT:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(FOUR_BIT[t.data_type]), name))
                widened += name == node.input[0]
    return widened


def _attr(node: onnx.NodeProto, name: str, default):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)
