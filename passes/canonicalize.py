"""canonicalize: rewrite what quantizers export into the one dialect the passes read, before analyze.

    quant_dtype → constants → lowbit → names → qoperator → dynamic → fakequant   (one module each in passes/dialects/)

Precondition: a ModelProto that passed the pipeline's source check.
Postcondition: a ModelProto computing the same function, with unique node names, where quantized
weights appear as integer initializer → DequantizeLinear → Conv/Gemm/MatMul wherever an exact rewrite
exists (the input model itself when nothing needed it); ctx.source is it; ctx.notes says what each dialect
module rewrote (and what it left, with the reason).
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from .context import Context, Pass
from .dialects import constants, dynamic, fakequant, lowbit, names, qoperator, quant_dtype


def canonical(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    notes = []
    if n := quant_dtype.run(model_copy):
        notes.append(f"{n} QuantizeLinear output_dtype attributes dropped (their zero points give the type)")
    if n := constants.run(model_copy):
        notes.append(f"{n} Constant nodes and Identity copies of constants read as initializers")
    if n := lowbit.run(model_copy):
        notes.append(f"{n} int4/uint4 weights held as int8/uint8")
    graph = gs.import_onnx(model_copy)
    if n := names.run(graph):
        notes.append(f"{n} unnamed or duplicate-named nodes renamed")
    n, kept = qoperator.run(graph)
    if n:
        notes.append(f"{n} QOperator nodes rewritten as QDQ")
    notes += [f"QOperator node left as is: {k}" for k in kept]
    if n := dynamic.run(graph):
        notes.append(f"{n} dynamic MatMulInteger/ConvInteger rewritten as QDQ weight sites (scale 1)")
    if n := fakequant.run(graph):
        notes.append(f"{n} float weights folded through their QuantizeLinear into integer initializers")
    if not notes:
        return model, []
    out = gs.export_onnx(graph.cleanup().toposort(), do_type_check=False)
    out.ir_version, out.producer_name, out.producer_version = model.ir_version, model.producer_name, model.producer_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out, notes


def run(model: onnx.ModelProto, ctx: Context) -> onnx.ModelProto:
    ctx.source, ctx.notes = canonical(model)
    return ctx.source


PASS = Pass("canonicalize", run, adds=("source", "notes"))
