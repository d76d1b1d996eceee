"""Opsets: the model keeps its own when it is at least BASE_OPSET (what the emitted ops need); it is
converted to WIDE_OPSET only when widen emits int16 DequantizeLinear. Shapes are inferred on every
import, since the branch rules need ranks (without them pair clones the suffix).
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from fgcompile.errors import CompileError

MIN_OPSET = 13    # per-channel QDQ (DequantizeLinear axis) arrived in opset 13
BASE_OPSET = 18   # BitwiseXor/BitwiseAnd (prng), ReduceMean with axes as an input (loss)
WIDE_OPSET = 21   # int16 DequantizeLinear (widen)


def version(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def at_least(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The model itself when its opset is >= target, else converted to target."""
    if version(model) >= target:
        return model
    try:
        return onnx.version_converter.convert_version(model, target)
    except Exception as exc:
        raise CompileError(f"the model is opset {version(model)} and could not be converted to opset "
                           f"{target} ({str(exc).splitlines()[0]}). Re-export it at opset {target}"
                           + (" or compile with --bits 8." if target == WIDE_OPSET else ".")) from None


def imported(model: onnx.ModelProto, target: int) -> gs.Graph:
    """The gs.Graph of `model` at opset >= target, with the shapes inference finds."""
    model = at_least(model, target)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:
        pass
    return gs.import_onnx(model)
