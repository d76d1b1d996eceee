"""prng: integer perturbations z generated in-graph from a seed input (counter-based hash).

Every runtime that implements uint32 Mul/Add/BitwiseXor/BitShift/BitwiseAnd and Gather reproduces
these bits; onnxruntime's Random* ops would not (their seed is an attribute and they advance per run).

    mix(x)       = lowbias32: x ^= x>>16; x *= 0x21f0aaad; x ^= x>>15; x *= 0x735a2d97; x ^= x>>15  (uint32)
    salt[t, i]   = mix((65536·t + i + 1) · 0x9E3779B9)       t: trainable index, i: stream index
    key[t, i]    = mix(mix(uint32(seed)) ^ salt[t, i])
    word[t, i, w] = mix(key[t, i] + w · 0x9E3779B9)          w: word index within the tensor
    c[t, i, j]   = (word[t, i, j div n] >> (k · (j mod n))) & (2^k − 1),   n = 32 / k
One hash word feeds n elements (element j is the flat index), so the hash costs 1/n of an element:
    rademacher: k = 1,  z = 2c − 1
    ternary:    k = 8,  z = (2·(c >> 7) − 1) · [(c & 0x7f) < D],  D = clamp(round(128·density), 1, 128)
    gaussian:   k = 8,  z = popcount(c & 0xf) − popcount(c >> 4)       (centred binomial, |z| <= 4)
(ternary and gaussian as a lookup of c in a 256-entry table). Streams i = 0..m−1 give z_i; stream
i = m gives the stochastic-rounding noise u = c & (2^lr_shift − 1) with k = 16.

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
NOISE_BITS = 16


def mix_np(x: np.ndarray) -> np.ndarray:
    """The same hash in numpy (compile-time salts)."""
    x = np.asarray(x, np.uint32)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(M1)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(M2)
    return x ^ (x >> np.uint32(15))


def salts(t: int, streams: np.ndarray) -> np.ndarray:
    i = np.asarray(streams, dtype=np.uint64)
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


CHUNK_BITS = {"rademacher": 1, "ternary": 8, "gaussian": 8}


def _lookup(spec) -> np.ndarray:
    """int32 table c -> z for the 8-bit chunk perturbations (ternary, gaussian)."""
    c = np.arange(256)
    if spec.perturbation == "ternary":
        keep = (c & 0x7F) < min(max(int(round(128 * spec.density)), 1), 128)
        return ((2 * (c >> 7) - 1) * keep).astype(np.int32)
    pop = np.array([bin(v).count("1") for v in range(16)])
    return (pop[c & 0xF] - pop[c >> 4]).astype(np.int32)


def _chunks(b: Builder, seed_mixed, sizes: list[int], streams: range, k: int):
    """c for `streams` of every trainable at once: int32 [len(streams), Σ padded numel], each tensor's
    elements padded to whole words. One hash over all words (fewer, larger nodes than one per tensor)."""
    n = 32 // k
    words = [-(-size // n) for size in sizes]
    all_salts = np.concatenate([salts(t, np.array(streams)) for t in range(len(sizes))])
    keys = _mix(b, b.op("BitwiseXor", [seed_mixed, all_salts], dtype=np.uint32))         # [T·S]
    owner = np.repeat(np.arange(len(sizes)), words)
    pick = owner[None, :] * len(streams) + np.arange(len(streams))[:, None]               # [S, ΣW]
    key = b.op("Gather", [keys, b.const(pick.astype(np.int64), "key_index")], {"axis": 0}, dtype=np.uint32)
    counter = np.concatenate([np.arange(w, dtype=np.uint64) for w in words]) * GOLDEN % 2 ** 32
    v = _mix(b, b.op("Add", [key, b.const(counter.astype(np.uint32), "counter")], dtype=np.uint32))
    if n > 1:
        v = b.op("Unsqueeze", [v, np.array([2], np.int64)], dtype=np.uint32)
        v = b.op("BitShift", [v, (np.arange(n) * k).astype(np.uint32)], {"direction": "RIGHT"}, dtype=np.uint32)
        v = b.op("Reshape", [v, np.array([len(streams), -1], np.int64)], dtype=np.uint32)
    if k < 32:
        v = b.op("BitwiseAnd", [v, np.array((1 << k) - 1, np.uint32)], dtype=np.uint32)
    return b.cast(v, np.int32), [w * n for w in words]


def _split(b: Builder, flat, sizes: list[int], padded: list[int], rows: int, shapes: list[list[int]]):
    """Per-trainable [rows, *shape] pieces (padding dropped) of an int32 [rows, Σ padded] tensor."""
    parts = [flat] if len(sizes) == 1 else b.op("Split", [flat, np.array(padded, np.int64)], {"axis": 1},
                                                dtype=np.int32, outputs=len(sizes))
    out = []
    for part, size, pad, shape in zip(parts, sizes, padded, shapes):
        if pad != size:
            part = b.op("Slice", [part, np.array([0], np.int64), np.array([size], np.int64),
                                  np.array([1], np.int64)], dtype=np.int32)
        out.append(b.op("Reshape", [part, np.array([rows] + shape if rows else shape, np.int64)], dtype=np.int32))
    return out


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    spec = ctx.spec
    b = Builder(graph, "prng")
    ctx.seed = gs.Variable("seed", dtype=np.int64, shape=[])
    graph.inputs.append(ctx.seed)
    seed_mixed = _mix(b, b.cast(ctx.seed, np.uint32))
    sizes = [tr.tensor.numel for tr in ctx.trainables]
    shapes = [list(tr.tensor.shape) for tr in ctx.trainables]
    c, padded = _chunks(b, seed_mixed, sizes, range(spec.m), CHUNK_BITS[spec.perturbation])
    if spec.perturbation == "rademacher":   # 2c − 1: onnxruntime's Gather costs ~10x an int32 Mul per element
        z = b.op("Sub", [b.op("Add", [c, c], dtype=np.int32), np.array(1, np.int32)], dtype=np.int32)
    else:
        z = b.op("Gather", [b.const(_lookup(spec), "z_table"), c], {"axis": 0}, dtype=np.int32)
    for tr, zt in zip(ctx.trainables, _split(b, z, sizes, padded, spec.m, shapes)):
        ctx.z[tr.name] = zt
    if spec.rounding == "stochastic":
        u, padded = _chunks(b, seed_mixed, sizes, range(spec.m, spec.m + 1), NOISE_BITS)
        u = b.op("BitwiseAnd", [u, np.array((1 << spec.lr_shift) - 1, np.int32)], dtype=np.int32)
        for tr, ut in zip(ctx.trainables, _split(b, u, sizes, padded, 0, shapes)):
            ctx.round_noise[tr.name] = ut
    return graph
