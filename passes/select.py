"""select: decide which quantized tensors train.

--train REGEX (repeatable) matches site (consumer node), weight or bias names with re.search; a match on
a site or weight trains the weight (a normalization's scale) and, unless include_bias is off, its bias;
a match on a bias name alone trains that bias. Without patterns, the `last` product sites (Conv, Gemm,
MatMul) nearest the output train, with their biases; normalization sites train only when named.

Precondition: ctx.io.sites from analyze.
Postcondition: ctx.trainables lists the tensors in site order (weight before its bias); each is an
initializer read by exactly one node (its DequantizeLinear, or the consumer of a float parameter, which
will train on the int32 grid of passes/floatgrid.py). The graph is unchanged.
"""
from __future__ import annotations

import re

import onnx_graphsurgeon as gs

from fgcompile.errors import CompileError, SpecError
from .context import Context, Pass, Trainable

INT_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "uint16": (0, 65535),
             # int32 biases keep headroom so that W ± ε·z·stride never wraps in int32
             "int32": (-(2 ** 30), 2 ** 30)}


def _products(ctx: Context) -> list:
    return [s for s in ctx.io.sites if s.kind == "product"]


def _chosen(ctx: Context) -> list[tuple[object, str]]:
    prompts = [(s, "weight") for s in ctx.io.sites if s.kind == "prompt"]   # --prompts always train
    return prompts + _patterned(ctx)


def _patterned(ctx: Context) -> list[tuple[object, str]]:
    spec = ctx.spec
    if not spec.train:
        return [(s, "weight+bias") for s in _products(ctx)[-spec.last:]]
    chosen = []
    for site in (s for s in ctx.io.sites if s.kind != "prompt"):
        hit = lambda name: name is not None and any(re.search(p, name) for p in spec.train)
        if hit(site.name) or hit(site.weight.name):
            chosen.append((site, "weight+bias"))
        elif site.bias is not None and hit(site.bias.name):
            chosen.append((site, "bias"))
    if not chosen:
        names = ", ".join(s.weight.name for s in ctx.io.sites)
        raise SpecError(f"--train {' '.join(spec.train)!r} matches no weight site. Sites: {names}. "
                        "Patterns are Python regexes searched in site, weight and bias names.")
    return chosen


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    if ctx.spec.last > len(_products(ctx)) and not ctx.spec.train:
        raise SpecError(f"--last {ctx.spec.last}: the model has only {len(_products(ctx))} weight sites.")
    tensors = {t.name: t for t in graph.tensors().values()}
    ctx.trainables = []
    for site, what in _chosen(ctx):
        parts = []
        w, b = site.weight, site.bias
        if b is not None and w.axis is not None and w.shape[w.axis] != b.numel:
            raise CompileError(f"weight {w.name!r} of {site.op} {site.name!r} is quantized per channel on axis "
                               f"{w.axis} ({w.shape[w.axis]} channels) but its bias {b.name!r} has {b.numel} "
                               "entries: per-input-channel scales cannot match the bias's per-output scale. "
                               "Quantize the weight per output channel (MatMul: the last axis) or per tensor, "
                               "or leave this site out of --train.")
        if "weight" in what:
            parts.append(({"product": "weight", "norm": "scale"}.get(site.kind, site.kind), site.weight))
        if site.bias is not None and ("bias" == what or ctx.spec.include_bias):
            parts.append(("bias", site.bias))
        for role, tensor in parts:
            consumers = tensors[tensor.name].outputs
            if len(consumers) != 1:
                users = ", ".join(n.name for n in consumers)
                raise CompileError(f"tensor {tensor.name!r} is shared by {len(consumers)} nodes ({users}); "
                                   "tied weights cannot train as one state tensor. Untie them in the "
                                   "exported model or leave this site out of --train.")
            grid = "int32" if tensor.dtype == "float32" else tensor.dtype  # floatgrid's int32 grid
            qmin, qmax = INT_RANGE[grid]
            ctx.trainables.append(Trainable(tensor, role, site.name, qmin, qmax, source_dtype=grid, op=site.op))
    return graph


PASS = Pass("select", run, reads=("io",), adds=("trainables",))

