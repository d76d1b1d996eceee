"""wide_product: A · W± for all 2m perturbed weights of a trained Gemm/MatMul as one product.

    A [.., M, K] @ [W⁺₀ … W⁻ₘ₋₁] [K, 2m·N] -> [.., M, 2m·N] -> Reshape [.., M, 2m, N] -> Transpose [2m, .., M, N]

One large GEMM instead of 2m small ones, and the perturbed weights keep a plain 2-D DequantizeLinear
(per-channel scales tiled once per branch), the form onnxruntime's QDQ fusion (QGemm,
MatMulIntegerToFloat) already handles. A perturbed Gemm bias folds into the wide Gemm the same way; a
frozen one is added after, by broadcasting.

Precondition: A is unbranched (the frozen prefix feeds the node); W is a perturbed weight [2m, K, N]
(or [2m, N, K] with transB) whose integers and quantization parameters branch_rules recorded.
Postcondition: the node's output is mapped to its leading form [2m, .., M, N], or nothing is emitted
(False) where shapes are not known.
"""
from __future__ import annotations

import numpy as np

from .branch_axis import BranchedTensors, optional, rank
from .graph_ops import Builder


def wide_product(s: BranchedTensors, node, ins, attrs) -> bool:
    b, n2m = s.b, s.n
    q, scale, zp, axis = s.dequantized[ins[1].name]
    out = node.outputs[0]
    if out.shape is None or q.shape is None or len(q.shape) != 3 or not all(isinstance(d, int) for d in q.shape[1:]):
        return False
    a = ins[0]
    ra = rank(a)
    if ra < 2 or (node.op == "Gemm" and attrs.get("transA", 0)):
        return False
    trans_b = node.op == "Gemm" and attrs.get("transB", 0)
    k, n = (q.shape[2], q.shape[1]) if trans_b else (q.shape[1], q.shape[2])
    if trans_b:   # [2m, N, K] -> [2m·N, K]
        q2 = b.op("Reshape", [q, np.array([n2m * n, k], np.int64)], dtype=q.dtype, shape=[n2m * n, k])
    else:         # [2m, K, N] -> [K, 2m, N] -> [K, 2m·N]
        q2 = b.op("Reshape", [b.op("Transpose", [q], {"perm": [1, 0, 2]}, dtype=q.dtype),
                              np.array([k, n2m * n], np.int64)], dtype=q.dtype, shape=[k, n2m * n])
    w2 = _side_by_side(b, q2, scale, zp, axis, 0 if trans_b else 1, n2m, out.dtype)
    c = optional(ins, 2) if node.op == "Gemm" else None
    bias = s.dequantized.get(c.name) if c is not None else None
    if node.op == "Gemm":
        folded = bias is not None and bias[0].shape is not None and len(bias[0].shape) == 2
        gemm_in = [a, w2]
        if folded:
            qb, sb, zb, ab = bias
            qb2 = b.op("Reshape", [qb, np.array([-1], np.int64)], dtype=qb.dtype, shape=[n2m * n])
            gemm_in.append(_side_by_side(b, qb2, sb, zb, ab, 0, n2m, out.dtype))
            c = None
        y = b.op("Gemm", gemm_in, {key: attrs[key] for key in ("alpha", "beta", "transB") if key in attrs},
                 dtype=out.dtype)
    else:
        y = b.op("MatMul", [a, w2], dtype=out.dtype)
    y = b.op("Reshape", [y, np.array([0] * (ra - 1) + [n2m, n], np.int64)], dtype=out.dtype)
    y = b.op("Transpose", [y], {"perm": [ra - 1] + list(range(ra - 1)) + [ra]}, dtype=out.dtype,
             hint=f"{node.name}.stacked")
    s.ranks[y.name] = ra
    if c is not None:   # an unbranched (frozen) or unfoldable bias: added after, by broadcasting
        c = s.padded(s.times_beta(s.lead(c) if s.stacked(c) else c, attrs.get("beta", 1.0), out.dtype), ra)
        y = b.op("Add", [y, c], dtype=out.dtype)
        s.ranks[y.name] = ra
    s.mapping[out.name] = s.register(y, out.shape, folded=False)
    return True


def _side_by_side(b: Builder, q2, scale, zp, axis, feature_axis: int, branches: int, dtype):
    """DequantizeLinear of a side-by-side weight ([2m·N, K], [K, 2m·N] or a [2m·N] bias). The layout keeps
    the original axis numbering; per-channel parameters on the feature axis repeat once per branch."""
    if axis is None:
        return b.op("DequantizeLinear", [q2, scale] + ([zp] if zp is not None else []), dtype=dtype)
    axis = axis % len(q2.shape)
    tile = (lambda v: np.tile(v, branches)) if axis == feature_axis else (lambda v: v)
    params = [b.const(tile(scale.values), "scale")] + \
        ([b.const(tile(zp.values), "zero_point")] if zp is not None else [])
    return b.op("DequantizeLinear", [q2] + params, {"axis": axis}, dtype=dtype)
