"""Build a corpus of the shipped digits models exported the ways quantizers do (no torch needed).

    python models/recipes/build_dialects.py [--out DIR]      (default ~/.cache/fgcompile/dialects)

From each fp32 model (digits_cnn: a CNN, digits_attn: a transformer) it writes one model per dialect:
    qdq          quantize_static, QuantFormat.QDQ, int8 per-channel weights, uint8 activations
    qdq_asym     per-tensor uint8 weights (asymmetric: zero points 120-142 here)
    qdq_asym_s8  int8 weights with nonzero zero points: qdq_asym's uint8 weights and zero points shifted
                 by −128 (the same function; quantize_static keeps int8 weights symmetric per channel)
    qoperator    quantize_static, QuantFormat.QOperator (QLinearConv, QGemm, QLinearMatMul, QLinearAdd, …)
    qoperator_u8 QOperator with per-tensor uint8 weights
    dynamic      quantize_dynamic, int8 weights (DynamicQuantizeLinear + MatMulInteger/ConvInteger)
    dynamic_u8   quantize_dynamic, per-channel uint8 weights
    fakequant    float weights → QuantizeLinear → DequantizeLinear (torch fake-quant / AIMET style),
                 built from qdq by putting the dequantized float weights back
    int4         quantize_static QDQ with QuantType.QInt4 per-channel weights
    unnamed      qdq with every node name erased (as quant_pre_process leaves many)
Calibration uses the first 128 source-domain training images. tests/passes/test_dialects.py and
benchmarks/dialects.py import `build`.
"""
from __future__ import annotations

import argparse
import pathlib
import tempfile

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                      quantize_static)

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHS = ("digits_cnn", "digits_attn")
DIALECTS = ("qdq", "qdq_asym", "qdq_asym_s8", "qoperator", "qoperator_u8", "dynamic", "dynamic_u8", "fakequant", "int4",
            "unnamed")


class _Calibration(CalibrationDataReader):
    def __init__(self):
        x = np.load(ROOT / "data" / "digits_source_train.npz")["x"][:128]
        self.batches = iter([{"x": x[i:i + 32]} for i in range(0, len(x), 32)])

    def get_next(self):
        return next(self.batches, None)


def _static(src, dst, fmt, weight_type, per_channel=True):
    quantize_static(str(src), str(dst), _Calibration(), quant_format=fmt, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=weight_type)


def signed_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """uint8 weights W, zp of a DequantizeLinear → int8 W − 128, zp − 128: (W − zp)·s is unchanged."""
    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(n.input) > 2:
            for name in (n.input[0], n.input[2]):
                a = numpy_helper.to_array(inits[name])
                if a.dtype == np.uint8:
                    inits[name].CopyFrom(numpy_helper.from_array((a.astype(np.int16) - 128).astype(np.int8), name))
    return model


def fake_quant(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each int8 weight W → DQ(s, zp) becomes float (W − zp)·s → QuantizeLinear(s, zp) → DQ(s, zp)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    nodes = []
    for n in out.graph.node:
        w = numpy_helper.to_array(inits[n.input[0]]) if n.op_type == "DequantizeLinear" and n.input[0] in inits else None
        if w is not None and w.dtype == np.int8:
            s, zp = (numpy_helper.to_array(inits[k]) for k in n.input[1:3])
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * w.ndim
            if s.size > 1:
                shape[axis] = s.size
            f = ((w.astype(np.float32) - zp.reshape(shape if zp.size > 1 else ())) * s.reshape(shape if s.size > 1 else ()))
            out.graph.initializer.append(numpy_helper.from_array(f.astype(np.float32), n.input[0] + "_float"))
            nodes.append(helper.make_node("QuantizeLinear", [n.input[0] + "_float", n.input[1], n.input[2]],
                                          [n.input[0] + "_fq"], name=n.name + "_fq",
                                          **({"axis": axis} if s.size > 1 else {})))
            n.input[0] = n.input[0] + "_fq"
        nodes.append(n)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {i for n in out.graph.node for i in n.input}
    keep = [i for i in out.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    return out


def build(arch: str, dialect: str) -> onnx.ModelProto:
    src = ROOT / arch / "fp32.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        dst = pathlib.Path(tmp) / "m.onnx"
        if dialect in ("qdq", "fakequant", "unnamed"):
            _static(src, dst, QuantFormat.QDQ, QuantType.QInt8)
        elif dialect in ("qdq_asym", "qdq_asym_s8"):
            _static(src, dst, QuantFormat.QDQ, QuantType.QUInt8, per_channel=False)
        elif dialect == "qoperator":
            _static(src, dst, QuantFormat.QOperator, QuantType.QInt8)
        elif dialect == "qoperator_u8":
            _static(src, dst, QuantFormat.QOperator, QuantType.QUInt8, per_channel=False)
        elif dialect == "int4":
            _static(src, dst, QuantFormat.QDQ, QuantType.QInt4)
        elif dialect == "dynamic":
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        elif dialect == "dynamic_u8":
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8, per_channel=True)
        else:
            raise ValueError(f"unknown dialect {dialect!r}; one of {', '.join(DIALECTS)}")
        model = onnx.load(str(dst))
    if dialect == "fakequant":
        model = fake_quant(model)
    if dialect == "qdq_asym_s8":
        model = signed_weights(model)
    if dialect == "unnamed":
        for n in model.graph.node:
            n.name = ""
    onnx.checker.check_model(model)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=pathlib.Path.home() / ".cache" / "fgcompile" / "dialects", type=pathlib.Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for arch in ARCHS:
        for dialect in DIALECTS:
            path = args.out / f"{arch}_{dialect}.onnx"
            onnx.save(build(arch, dialect), str(path))
            print(path)


if __name__ == "__main__":
    main()
