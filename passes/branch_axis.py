"""branch_axis: the two forms a tensor of the trained suffix takes when all 2m branches run at once.

    folded   [2m·B, ...]   branch-major in the batch axis: batch-wise ops (Conv, pooling, Gemm, MatMul on
                           frozen weights, Q/DQ) run unchanged, once, on 2m·B rows, and keep the QDQ
                           patterns onnxruntime fuses to int8 kernels
    leading  [2m, B, ...]  a new leading axis that numpy broadcasting carries (a per-branch weight or bias,
                           an unstacked operand of another batch size)
Converting between them is a Reshape (of the integer input when a per-tensor DequantizeLinear makes the
tensor, so the DQ stays next to its consumer). BranchedTensors holds, per original tensor, its branched
tensor and form; the per-op rules (passes/branch_rules.py) read and extend it.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .graph_ops import Builder


class Unstackable(Exception):
    """Why an op cannot carry the branch axis (branch_rules adds the node)."""


def rank(t: gs.Tensor) -> int:
    if isinstance(t, gs.Constant):
        return t.values.ndim
    if t.shape is None:
        raise Unstackable(f"unknown rank of {t.name}")
    return len(t.shape)


def optional(ins: list, k: int):
    """Input k of a rule's inputs, or None when the node omits it (branch_rules maps an absent or
    empty-named input to None)."""
    return ins[k] if k < len(ins) else None


def per_axis(scale: gs.Tensor) -> bool:
    """A 1-D scale of more than one element: per-channel quantization along the node's axis."""
    shape = scale.values.shape if isinstance(scale, gs.Constant) else scale.shape
    return shape is not None and len(shape) == 1 and shape[0] != 1


def per_tensor_dq(t: gs.Tensor):
    """The DequantizeLinear that makes `t` with constant per-tensor parameters, else None."""
    p = t.inputs[0] if t.inputs else None
    if p is not None and p.op == "DequantizeLinear" and all(
            isinstance(q, gs.Constant) and q.values.size == 1 for q in p.inputs[1:]):
        return p
    return None


class BranchedTensors:
    """The branched tensors of a suffix: `mapping` from original names, with ranks, shapes and forms."""

    def __init__(self, graph, stacked: dict, branches: int, needed: set, parts: dict | None = None):
        self.b, self.n, self.needed = Builder(graph, "stack"), branches, needed
        self.mapping = dict(stacked)
        self.ranks = {t.name: rank(t) - 1 for t in stacked.values()}   # branched name -> unbranched rank
        self.shapes = {t.name: list(t.shape[1:]) for t in stacked.values()}
        self.folded: set[str] = set()
        self.views: dict = {}        # (name, folded?) -> converted tensor
        self.perturbed = {t.name for t in stacked.values()}
        # the float output of a perturbed weight's dequantization -> (q, scale, zero point, axis)
        self.dequantized: dict[str, tuple] = {}
        # stacked name -> part(b, k, lo, hi): branch k of a perturbed weight (its output channels lo:hi when
        # given) built from its inputs, without the whole [2m, *shape] tensor
        self.parts: dict = dict(parts or {})

    def stacked(self, t) -> bool:
        return t is not None and t.name in self.ranks

    def rank(self, t) -> int:
        return self.ranks[t.name] if t.name in self.ranks else rank(t)

    def register(self, y, orig_shape, folded: bool):
        self.ranks[y.name] = len(orig_shape)
        self.shapes[y.name] = list(orig_shape)
        y.shape = list(orig_shape) if folded else [self.n] + list(orig_shape)
        if folded:
            y.shape[0] = self.n * y.shape[0] if isinstance(y.shape[0], int) else None
            self.folded.add(y.name)
        return y

    def _static_tail(self, t) -> list[int]:
        tail = self.shapes[t.name][1:]
        if not all(isinstance(d, int) for d in tail):
            raise Unstackable(f"{t.name} has non-static dims {tail}")
        return tail

    def lead(self, t):
        """[2m, B, ...] view of a branched tensor."""
        if t.name not in self.folded:
            return t
        return self._view(t, [self.n, -1] + self._static_tail(t), folded=False)

    def fold(self, t):
        """[2m·B, ...] view of a branched tensor."""
        if t.name in self.folded:
            return t
        if self.ranks[t.name] == 0:
            raise Unstackable("a scalar has no batch axis to fold into")
        return self._view(t, [-1] + self._static_tail(t), folded=True)

    def _view(self, t, shape, folded):
        key = (t.name, folded)
        if key not in self.views:
            self.views[key] = self.register(self.on_integers(t, lambda x: self.b.op(
                "Reshape", [x, np.array(shape, np.int64)], dtype=x.dtype)), self.shapes[t.name], folded)
        return self.views[key]

    def on_integers(self, t, layout):
        """layout(t), applied before a per-tensor DequantizeLinear when one makes t: it moves a quarter of
        the bytes, and the DQ stays next to its consumer, the QDQ pattern onnxruntime fuses."""
        p = per_tensor_dq(t)
        if p is not None:
            return self.b.op("DequantizeLinear", [layout(p.inputs[0])] + p.inputs[1:], dict(p.attrs), dtype=t.dtype)
        return layout(t)

    def emit(self, node, op_type, inputs, attrs, folded: bool, out_shape=None):
        """The branched form of `node`'s output: one `op_type` node on branched inputs."""
        out = node.outputs[0]
        y = self.b.op(op_type, inputs, attrs, dtype=out.dtype, hint=f"{node.name}.stacked")
        shape = out_shape if out_shape is not None else out.shape
        if shape is None:
            raise Unstackable(f"unknown shape of {out.name}")
        self.mapping[out.name] = self.register(y, shape, folded)
        return y

    def below_batch(self, t, out_rank: int) -> bool:
        """An unbranched operand that broadcasts without touching the batch axis (rank below the output's,
        or a size-1 batch axis)."""
        if isinstance(t, gs.Constant):
            shape = t.values.shape
        elif t.shape is None:
            return False
        else:
            shape = t.shape
        return len(shape) < out_rank or shape[0] == 1

    def leading_elementwise(self, node, ins, attrs):
        """`node` on the leading form: branched inputs of lower rank padded after the branch axis."""
        out_rank = max(self.rank(t) for t in ins if t is not None)
        ins = [self.lead(t) if self.stacked(t) else t for t in ins]
        if node.op in ("QuantizeLinear", "DequantizeLinear") and per_axis(ins[1]):
            axis = attrs.get("axis", 1)
            if axis >= 0:
                attrs["axis"] = axis + 1
        self.emit(node, node.op, [self.padded(t, out_rank) for t in ins], attrs, folded=False)

    def padded(self, t, out_rank: int):
        """A leading-form tensor with size-1 axes after the branch axis up to `out_rank` (else `t`)."""
        if self.stacked(t) and self.ranks[t.name] < out_rank:
            return self.b.op("Unsqueeze", [t, np.arange(1, 1 + out_rank - self.ranks[t.name], dtype=np.int64)],
                             dtype=t.dtype)
        return t

    def times_beta(self, c: gs.Tensor, beta: float, dtype) -> gs.Tensor:
        """Gemm's β·C (C itself when β = 1), keeping C's branch rank if C is branched."""
        if beta == 1.0:
            return c
        y = self.b.op("Mul", [c, np.array(beta, np.float32)], dtype=dtype)
        if c.name in self.ranks:
            self.ranks[y.name] = self.ranks[c.name]
        return y
