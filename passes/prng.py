"""prng: integer perturbations z generated in-graph from a seed input (counter-based hash).

Every runtime that implements uint32 Mul/Add/BitwiseXor/BitShift reproduces these bits; onnxruntime's
Random* ops would not (their seed is an attribute and they advance per run).

    mix(x)      = lowbias32: x ^= x>>16; x *= 0x21f0aaad; x ^= x>>15; x *= 0x735a2d97; x ^= x>>15  (uint32)
    salt[t, i]  = mix((65536·t + i + 1) · 0x9E3779B9)        t: trainable index, i: stream index
    key[t, i]   = mix(mix(uint32(seed)) ^ salt[t, i])
    v[t, i, j]  = mix(key[t, i] + j · 0x9E3779B9)            j: flat element index
    rademacher: z = 2·(v >> 31) − 1
    ternary:    z = (2·(v >> 31) − 1) · [(v & 0x7fffffff) < round(density · 2^31)]
    gaussian:   z = popcount(v & 0xf) − popcount((v >> 4) & 0xf)     (centred binomial, |z| <= 4)
Streams i = 0..m−1 give z_i; stream i = m gives the stochastic-rounding noise u = v & (2^lr_shift − 1).

Precondition: ctx.state_in from lift.
Postcondition: a `seed` input (int64 scalar); ctx.z[name] int32 [m, *shape]; ctx.round_noise[name] int32
[*shape] when rounding is stochastic. No existing node changes.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .context import Context
from .graph_ops import Builder

GOLDEN = 0x9E3779B9
M1, M2 = 0x21F0AAAD, 0x735A2D97


def mix_np(x: np.ndarray) -> np.ndarray:
    """The same hash in numpy (compile-time salts)."""
    x = np.asarray(x, np.uint32)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(M1)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(M2)
    return x ^ (x >> np.uint32(15))


def salts(t: int, streams: int) -> np.ndarray:
    i = np.arange(streams, dtype=np.uint64)
    return mix_np(((65536 * t + i + 1) * GOLDEN) % 2 ** 32)


def _mix(b: Builder, x):
    u32 = lambda v: np.array(v, np.uint32)
    shr = lambda x, k: b.op("BitShift", [x, u32(k)], {"direction": "RIGHT"}, dtype=np.uint32)
    xor = lambda x, y: b.op("BitwiseXor", [x, y], dtype=np.uint32)
    x = xor(x, shr(x, 16))
    x = b.op("Mul", [x, u32(M1)], dtype=np.uint32)
    x = xor(x, shr(x, 15))
    x = b.op("Mul", [x, u32(M2)], dtype=np.uint32)
    return xor(x, shr(x, 15))


def _bits(b: Builder, seed_mixed, t: int, streams: int, numel: int):
    """v for streams 0..streams−1 of trainable t: uint32 [streams, numel]."""
    key = _mix(b, b.op("BitwiseXor", [seed_mixed, salts(t, streams)], dtype=np.uint32))
    key = b.op("Unsqueeze", [key, np.array([1], np.int64)], dtype=np.uint32)
    counter = (np.arange(numel, dtype=np.uint64) * GOLDEN % 2 ** 32).astype(np.uint32)
    return _mix(b, b.op("Add", [key, b.const(counter, "counter")], dtype=np.uint32))


GAUSS_TABLE = np.array([bin(k & 15).count("1") - bin(k >> 4).count("1") for k in range(256)], np.int32)


def _perturbation(b: Builder, v, spec):
    u32 = lambda x: np.array(x, np.uint32)
    if spec.perturbation == "gaussian":
        idx = b.cast(b.op("BitwiseAnd", [v, u32(0xFF)], dtype=np.uint32), np.int64)
        return b.op("Gather", [b.const(GAUSS_TABLE, "gauss_table"), idx], dtype=np.int32)
    top = b.cast(b.op("BitShift", [v, u32(31)], {"direction": "RIGHT"}, dtype=np.uint32), np.int32)
    z = b.op("Sub", [b.op("Mul", [top, np.array(2, np.int32)], dtype=np.int32), np.array(1, np.int32)],
             dtype=np.int32)
    if spec.perturbation == "ternary":
        low = b.cast(b.op("BitwiseAnd", [v, u32(0x7FFFFFFF)], dtype=np.uint32), np.int32)
        thr = np.array(min(int(round(spec.density * 2 ** 31)), 2 ** 31 - 1), np.int32)
        keep = b.cast(b.op("Less", [low, thr], dtype=bool), np.int32)
        z = b.op("Mul", [z, keep], dtype=np.int32)
    return z


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    spec = ctx.spec
    b = Builder(graph, "prng")
    ctx.seed = gs.Variable("seed", dtype=np.int64, shape=[])
    graph.inputs.append(ctx.seed)
    seed_mixed = _mix(b, b.cast(ctx.seed, np.uint32))
    stochastic = spec.rounding == "stochastic"
    for t, tr in enumerate(ctx.trainables):
        shape = list(tr.tensor.shape)
        v = _bits(b, seed_mixed, t, spec.m + int(stochastic), tr.tensor.numel)
        vz = b.op("Slice", [v, np.array([0], np.int64), np.array([spec.m], np.int64)], dtype=np.uint32) \
            if stochastic else v
        z = _perturbation(b, vz, spec)
        ctx.z[tr.name] = b.op("Reshape", [z, np.array([spec.m] + shape, np.int64)], dtype=np.int32,
                              hint="z")
        if stochastic:
            row = b.op("Slice", [v, np.array([spec.m], np.int64), np.array([spec.m + 1], np.int64)],
                       dtype=np.uint32)
            mask = np.array((1 << spec.lr_shift) - 1, np.uint32)
            noise = b.cast(b.op("BitwiseAnd", [row, mask], dtype=np.uint32), np.int32)
            ctx.round_noise[tr.name] = b.op("Reshape", [noise, np.array(shape, np.int64)], dtype=np.int32,
                                            hint="round_noise")
    return graph
