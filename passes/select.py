"""select: decide which quantized tensors train.

--train REGEX (repeatable) matches site (consumer node), weight or bias names with re.search; a match on
a site or weight trains the weight (a normalization's scale) and, unless include_bias is off, its bias;
a match on a bias name alone trains that bias. Without patterns, the `last` product sites (Conv, Gemm,
MatMul) nearest the output train, with their biases; normalization sites train only when named.
--freeze REGEX (repeatable) matches site, weight or bias names the same way; a frozen site trains neither
its weight nor its bias, whatever --train or --last say, and --last counts the sites not frozen (a fixed
basis near the output does not use up the count). Each --freeze pattern must match a site, and a freeze
that leaves no product site to train is refused.

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


def _names(site) -> list[str]:
    return [n for n in (site.name, site.weight.name, site.bias.name if site.bias else None) if n is not None]


def _matches(patterns, site) -> bool:
    return any(re.search(p, n) for p in patterns for n in _names(site))


def _frozen(ctx: Context) -> set[str]:
    """The sites --freeze names; each pattern must name one, and something must be left to train."""
    spec, sites = ctx.spec, [s for s in ctx.io.sites if s.kind != "prompt"]
    listing = ", ".join(s.name for s in sites)
    for p in spec.freeze:
        if not any(_matches([p], s) for s in sites):
            raise SpecError(f"--freeze {p!r} matches no weight site. Sites: {listing}. Patterns are Python regexes "
                            "searched in site, weight and bias names.")
    frozen = {s.name for s in sites if _matches(spec.freeze, s)}
    if frozen and not spec.train and all(s.name in frozen for s in sites if s.kind == "product") \
            and not any(s.kind == "prompt" for s in ctx.io.sites):
        raise SpecError(f"--freeze {' '.join(spec.freeze)!r} freezes every weight site ({listing}); nothing is left "
                        "to train. Freeze fewer layers.")
    return frozen


def _products(ctx: Context, frozen=frozenset()) -> list:
    return [s for s in ctx.io.sites if s.kind == "product" and s.name not in frozen]


def _chosen(ctx: Context) -> list[tuple[object, str]]:
    prompts = [(s, "weight") for s in ctx.io.sites if s.kind == "prompt"]   # --prompts always train
    return prompts + _patterned(ctx, _frozen(ctx))


def _patterned(ctx: Context, frozen: set[str]) -> list[tuple[object, str]]:
    spec = ctx.spec
    if not spec.train:
        products = _products(ctx, frozen)
        if spec.last > len(products):
            left = f" that --freeze leaves ({len(frozen)} frozen); lower --last or freeze fewer" if frozen else ""
            raise SpecError(f"--last {spec.last}: the model has only {len(products)} weight sites{left}.")
        return [(s, "weight+bias") for s in products[-spec.last:]]
    chosen = []
    for site in (s for s in ctx.io.sites if s.kind != "prompt" and s.name not in frozen):
        hit = lambda name: name is not None and any(re.search(p, name) for p in spec.train)
        if hit(site.name) or hit(site.weight.name):
            chosen.append((site, "weight+bias"))
        elif site.bias is not None and hit(site.bias.name):
            chosen.append((site, "bias"))
    if not chosen:
        names = ", ".join(s.weight.name for s in ctx.io.sites)
        also = f" that --freeze {' '.join(spec.freeze)!r} leaves" if frozen else ""
        raise SpecError(f"--train {' '.join(spec.train)!r} matches no weight site{also}. Sites: {names}. "
                        "Patterns are Python regexes searched in site, weight and bias names.")
    return chosen


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
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

