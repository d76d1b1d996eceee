"""prng: integer perturbations z generated in-graph from a (seed, step) input pair (counter-based hash).

Stream "fgc-int32/2". Every op of the hash is int32 with two's-complement wraparound (Mul, Add,
BitwiseXor, BitwiseAnd, Gather) plus Div by a power of two of a value that is a multiple of it, whose
quotient has at most 24 significant bits: exact on a runtime that divides integers in float32, as
OpenVINO's CPU plugin does. There are no uint32 tensors, no constants outside int32 and no BitShift
(unsigned only in ONNX), so onnxruntime, the ONNX reference evaluator and OpenVINO (which computes
integer ops in int32 and has no uint32) draw the same bits. onnxruntime's Random* ops would not (their
seed is an attribute and they advance per run).

The formulas, on 32-bit words (u32 arithmetic mod 2^32; the graph holds the same bits as int32):
    mix(x)         = lowbias32: x ^= x>>16; x *= 0x21f0aaad; x ^= x>>15; x *= 0x735a2d97; x ^= x>>15
    salt[t, i]     = mix((65536·t + i + 1) · 0x9E3779B9)         t: trainable index, i: stream index
    key[t, i]      = mix(mix(seed ^ salt[t, i]) + step)          seed, step: the two int32 inputs
    word[t, i, w]  = mix(key[t, i] + w · 0x9E3779B9)             w: word index within the tensor
    c[t, i, j]     = (word[t, i, j div n] >> (k · (j mod n))) & (2^k − 1),   n = 32 / k
The key is a bijection of step for a fixed seed and of seed for a fixed step, and the seed is mixed
before the step is added, so seeds s and s+1 draw unrelated streams (not one stream shifted by a step).
One hash word feeds n elements (element j is the flat index), so the hash costs 1/n of an element:
    rademacher: k = 1,  z = 2c − 1
    ternary:    k = 8,  z = (2·(c >> 7) − 1) · [(c & 0x7f) < D],  D = clamp(round(128·density), 1, 128)
    gaussian:   k = 8,  z = popcount(c & 0xf) − popcount(c >> 4)       (centred binomial, |z| <= 4)
z is read as int8 from a table indexed by each word's bytes: the signs of a byte's 8 bits (rademacher),
or the 256-entry table of c (ternary, gaussian). Streams i = 0..m−1 give z_i; stream
i = m gives the stochastic-rounding noise u = c & (2^lr_shift − 1) with k = 16, stream i = m + 1 the
sparse-update noise u = c with k = 16 (--sparsity with --sparse-mode random or topk), streams
i = m + 2 … 2m + 1 the momentum-guided sampling's choice c with k = 8 (one per zᵢ, --momentum).
In int32, x >> k (logical) is ((x & −2^k) / 2^k) & (2^(32−k) − 1): the masked Div is exact.

Precondition: ctx.trainables (their shapes; lift has made them state).
Postcondition: `seed` and `step` inputs (int32 scalars); ctx.perturbations.z[name] int8 [m, *shape]
(dead, and dropped by finalize, when the memory-bounded form draws each zᵢ inside its Loop with
.z_at(b, i), a stream index known at run time whose salt is hashed in-graph: int8 [*shape], the same
values as row i; or with .z_words for a range of a tensor's hash words, so a piece of it is drawn alone);
.round_noise[name] int32 [*shape] when rounding is stochastic; .sparse_noise[name] int32 [*shape] in
[0, 2^16) when a sparse update draws; .per_example(b, t, count) draws the node estimator's noise (stream
i of trainable t, a count known at run time). No existing node changes.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import formulas
from .context import Context, Pass, Perturbations
from .formulas import CHUNK_BITS, elements_per_word
from .graph_ops import Builder

STREAM = "fgc-int32/2"
GOLDEN = 0x9E3779B9
M1, M2 = 0x21F0AAAD, 0x735A2D97
NOISE_BITS = 16


def int32(v) -> np.ndarray:
    """The int32 holding the low 32 bits of v (two's complement)."""
    return (np.asarray(v, np.int64) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def mix_np(x: np.ndarray) -> np.ndarray:
    """The same hash in numpy (compile-time salts), on uint32."""
    x = np.asarray(x, np.uint32)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(M1)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(M2)
    return x ^ (x >> np.uint32(15))


def salts(t: int, streams: np.ndarray) -> np.ndarray:
    i = np.asarray(streams, dtype=np.uint64)
    return mix_np(((65536 * t + i + 1) * GOLDEN) % 2 ** 32)


def _shr(b: Builder, x, k: int, lanes=None):
    """Logical x >> k of int32 words: mask off the low k bits so the Div is exact, then drop the sign
    extension. `lanes` instead gives one shift per trailing lane (k·lane), keeping k bits of each."""
    if lanes is None:
        masks, divisors, keep = -(1 << k), 1 << k, (1 << (32 - k)) - 1
    else:
        masks = int32(((1 << k) - 1) << (k * lanes))
        divisors, keep = (1 << (k * lanes)).astype(np.int32), (1 << k) - 1
    x = b.op("BitwiseAnd", [x, int32(masks)], dtype=np.int32)
    x = b.op("Div", [x, np.asarray(divisors, np.int32)], dtype=np.int32)
    return b.op("BitwiseAnd", [x, np.array(keep, np.int32)], dtype=np.int32)


def _mix(b: Builder, x):
    xor = lambda x, y: b.op("BitwiseXor", [x, y], dtype=np.int32)
    x = xor(x, _shr(b, x, 16))
    x = b.op("Mul", [x, int32(M1)], dtype=np.int32)
    x = xor(x, _shr(b, x, 15))
    x = b.op("Mul", [x, int32(M2)], dtype=np.int32)
    return xor(x, _shr(b, x, 15))


# SIGNS[c, j]: +1 where bit j of the byte c is set, else −1 (the ±1 perturbation's byte table)
SIGNS = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, 1, -1).astype(np.int8)


def _lookup(spec) -> np.ndarray:
    """int32 table c -> z for the 8-bit chunk perturbations (ternary, gaussian)."""
    c = np.arange(256)
    if spec.perturbation == "ternary":
        keep = (c & 0x7F) < min(max(int(round(128 * spec.density)), 1), 128)
        return ((2 * (c >> 7) - 1) * keep).astype(np.int32)
    pop = np.array([bin(v).count("1") for v in range(16)])
    return (pop[c & 0xF] - pop[c >> 4]).astype(np.int32)


def _salts(b: Builder, tensors: list[int], streams):
    """salt[t, i] for the trainable indices t in `tensors`, t-major: int32 [T·S]. `streams` a range
    (constants) or an int32 [1] tensor holding one stream index known only when the graph runs (a Loop's
    counter)."""
    if isinstance(streams, range):
        return int32(np.concatenate([salts(t, np.array(streams)) for t in tensors]))
    base = int32(65536 * np.asarray(tensors, dtype=np.int64) + 1)
    return _mix(b, b.i32.Mul(b.i32.Add(streams, base), int32(GOLDEN)))


def _keys(b: Builder, seed, step, salt):
    """key = mix(mix(seed ^ salt) + step), elementwise over int32 salts (every stream draws from its key)."""
    return _mix(b, b.op("Add", [_mix(b, b.op("BitwiseXor", [seed, salt], dtype=np.int32)), step], dtype=np.int32))


def _words(b: Builder, seed, step, sizes: list[int], streams, n: int, tensors=None):
    """word for `streams` (a range, or an int32 [1] stream tensor) of every trainable at once (of those
    with indices `tensors`, sized `sizes`, when given): int32 [len(streams), Σ words]. One hash over all
    words (fewer, larger nodes than one per tensor); each tensor's keys broadcast over its counters."""
    words = [-(-size // n) for size in sizes]
    keys = _keys(b, seed, step, _salts(b, list(range(len(sizes))) if tensors is None else tensors, streams))
    keys = b.op("Reshape", [keys, np.array([len(sizes), _rows(streams), 1], np.int64)], dtype=np.int32)
    parts = [b.op("Add", [b.op("Gather", [keys, np.array(t, np.int64)], {"axis": 0}, dtype=np.int32),
                          b.const(int32(np.arange(w, dtype=np.uint64) * GOLDEN), "counter")], dtype=np.int32)
             for t, w in enumerate(words)]
    counted = parts[0] if len(parts) == 1 else b.op("Concat", parts, {"axis": 1}, dtype=np.int32)
    return _mix(b, counted), words


def _per_lane(b: Builder, words, rows: int, n: int, lane_op):
    """lane_op on [rows, W, n] (each word broadcast over its n lanes), flattened to [rows, W·n]."""
    lanes = lane_op(b.op("Unsqueeze", [words, np.array([2], np.int64)], dtype=np.int32))
    return b.op("Reshape", [lanes, np.array([rows, -1], np.int64)], dtype=np.int32)


def _chunks(b: Builder, seed, step, sizes: list[int], streams, k: int, tensors=None):
    """c for `streams` of every trainable at once: int32 [len(streams), Σ padded numel], each tensor's
    elements padded to whole words (k = 8 or 16): the noise streams (rounding, sparsity, momentum)."""
    n = 32 // k
    v, words = _words(b, seed, step, sizes, streams, n, tensors)
    return _per_lane(b, v, _rows(streams), n, lambda v: _shr(b, v, k, lanes=np.arange(n, dtype=np.int64))), \
        [w * n for w in words]


def _z_of_words(b: Builder, v, rows: int, spec, large: bool = True):
    """int8 z of hash words v [rows, W]: [rows, W·n]. Each word's 4 bytes index a table: for ±1 bits, of
    the signs of a byte's 8 bits (element 32w + 8k + j is bit j of byte k, bit 8k + j of word w); for 8-bit
    chunks, of the perturbation's values (element 4w + k is byte k). One Gather per byte: a bit test
    broadcast over 8 or 32 lanes runs onnxruntime's slow short-span broadcast on every element."""
    table = SIGNS if spec.perturbation == "rademacher" else _lookup(spec).astype(np.int8)
    z = b.op("Gather", [b.const(table, "z_table"), _octets(b, v, large)], {"axis": 0}, dtype=np.int8)
    return b.op("Reshape", [z, np.array([rows, -1], np.int64)], dtype=np.int8)


def _octets(b: Builder, v, large: bool):
    """The 4 bytes of each int32 word of v [rows, W], low first: int32 [rows, W, 4] in [0, 256). For many
    words each byte is masked and divided on its own (a scalar op over all words: onnxruntime's fast path;
    a [4] mask broadcast along the last axis takes 3-4x as long) and the bytes meet in one Concat; for a
    few, the broadcast's 4 nodes cost less than 13."""
    if not large:
        return _shr(b, b.op("Unsqueeze", [v, np.array([2], np.int64)], dtype=np.int32), 8,
                    lanes=np.arange(4, dtype=np.int64))
    lanes = []
    for k in range(4):
        x = b.op("BitwiseAnd", [v, int32(0xFF << (8 * k))], dtype=np.int32)
        if k:
            x = b.op("Div", [x, np.array(1 << (8 * k), np.int32)], dtype=np.int32)
        if k == 3:      # the top byte's Div keeps the sign: −128..127
            x = b.op("BitwiseAnd", [x, np.array(0xFF, np.int32)], dtype=np.int32)
        lanes.append(b.op("Unsqueeze", [x, np.array([2], np.int64)], dtype=np.int32))
    return b.op("Concat", lanes, {"axis": 2}, dtype=np.int32)


def _rows(streams) -> int:
    return len(streams) if isinstance(streams, range) else 1


def _z(b: Builder, seed, step, spec, sizes: list[int], streams, tensors=None) -> list:
    """zᵢ for `streams` of each trainable (of those with indices `tensors` when given): int8 [S, padded
    numel] per tensor, and the padded sizes. One hash over all words. A large tensor (formulas.chunked's
    CHUNK) has its words split off before they become elements, so its z is never copied out of a shared
    one; runs of small tensors share one expansion (fewer nodes), split after."""
    n, rows = elements_per_word(spec), _rows(streams)
    v, words = _words(b, seed, step, sizes, streams, n, tensors)
    groups = []                     # runs of tensor indices expanded together
    for t, size in enumerate(sizes):
        if size > formulas.CHUNK or not groups or sizes[groups[-1][-1]] > formulas.CHUNK:
            groups.append([t])
        else:
            groups[-1].append(t)
    counts = [sum(words[t] for t in g) for g in groups]
    parts = [v] if len(groups) == 1 else b.op("Split", [v, np.array(counts, np.int64)], {"axis": 1},
                                              dtype=np.int32, outputs=len(groups))
    out = []
    for g, part in zip(groups, parts):
        z = _z_of_words(b, part, rows, spec, large=sizes[g[0]] > formulas.CHUNK)
        out += [z] if len(g) == 1 else b.op("Split", [z, np.array([words[t] * n for t in g], np.int64)], {"axis": 1},
                                             dtype=np.int8, outputs=len(g))
    return out, [w * n for w in words]


def drawer(seed, step, spec, trainables):
    """z_at(b, i, subset=None): {name: zᵢ int8 [*shape]} for one pair index i (an int32 [1] tensor, e.g. a
    Loop's counter) of every trainable (or of those in `subset`), built with Builder b (a Loop body's): the
    same values as row i of z, without the other rows. With --momentum, momentum_at(b, i) gives the
    matching row of the sampling noise (stream m + 2 + i)."""
    sizes = [tr.tensor.numel for tr in trainables]

    def z_at(b: Builder, i, subset=None):
        subset = trainables if subset is None else subset
        index = [next(t for t, tr in enumerate(trainables) if tr.name == s.name) for s in subset]
        parts, padded = _z(b, seed, step, spec, [sizes[t] for t in index], i, index)
        return _shaped(b, parts, subset, padded, 0)

    def momentum_at(b: Builder, i):
        c, padded = _chunks(b, seed, step, sizes, b.i32.Add(i, spec.m + 2), 8)
        return _split(b, c, trainables, padded, 0)
    return z_at, momentum_at


def words_drawer(b: Builder, seed, step, spec, trainables):
    """z_words(b_, name, first, count, stream=None): every zᵢ (or the one for i = stream, an int32 [1]
    tensor) of one trainable on its words first .. first + count − 1 (first an int32 [1] tensor, known at
    run time or not), int8 [m or 1, count · elements_per_word(spec)]: the same bits as those columns of
    z, for a piece of a tensor (update's row chunks, the loop form's Conv pieces). The m keys of a
    trainable are hashed with b the first time it is asked for, once (a graph without pieces has none)."""
    m, n = spec.m, elements_per_word(spec)
    keys = {}

    def key_of(name: str):
        if name not in keys:
            t = next(t for t, tr in enumerate(trainables) if tr.name == name)
            keys[name] = b.op("Unsqueeze", [_keys(b, seed, step, int32(salts(t, np.arange(m)))),
                                            np.array([1], np.int64)], dtype=np.int32)                # [m, 1]
        return keys[name]

    def z_words(b_: Builder, name: str, first, count: int, stream=None):
        counter = b_.i32.Add(b_.i32.Mul(first, int32(GOLDEN)), int32(np.arange(count, dtype=np.uint64) * GOLDEN))
        key, rows = key_of(name), m
        if stream is not None:      # one zᵢ: i an int32 [1] tensor
            key, rows = b_.op("Gather", [key, stream], {"axis": 0}, dtype=np.int32), 1
        return _z_of_words(b_, _mix(b_, b_.op("Add", [key, counter], dtype=np.int32)), rows, spec)
    return z_words


def example_drawer(seed, step, spec):
    """per_example(b, t, count) -> int8 [m, count]: the ±1 noise of the node estimator for trainable index t
    (its layer's stream id), streams i = 0..m−1, elements 0..count−1 (count an int64 scalar tensor known
    when the graph runs: the batch times the layer's output per example). The same hash as z: element j
    of stream i is bit j mod 32 of word j div 32 of key[t, i]."""
    def per_example(b: Builder, t: int, count):
        words = b.op("Div", [b.op("Add", [count, np.array(31, np.int64)], dtype=np.int64), np.array(32, np.int64)],
                     dtype=np.int64)
        counter = b.op("Range", [np.array(0, np.int32), b.cast(words, np.int32), np.array(1, np.int32)],
                       dtype=np.int32)
        keys = b.op("Unsqueeze", [_keys(b, seed, step, int32(salts(t, np.arange(spec.m)))),
                                  np.array([1], np.int64)], dtype=np.int32)                  # [m, 1]
        v = _mix(b, b.i32.Add(keys, b.i32.Mul(counter, int32(GOLDEN))))                     # [m, words]
        u = _z_of_words(b, v, spec.m, spec)
        end = b.op("Unsqueeze", [count, np.array([0], np.int64)], dtype=np.int64)
        return b.op("Slice", [u, np.array([0], np.int64), end, np.array([1], np.int64)], dtype=np.int8)
    return per_example


def _split(b: Builder, flat, trainables, padded: list[int], rows: int) -> dict:
    """{name: [rows, *shape] piece} (padding dropped) of a [rows, Σ padded] tensor, one per trainable."""
    parts = [flat] if len(trainables) == 1 else b.op("Split", [flat, np.array(padded, np.int64)], {"axis": 1},
                                                     dtype=flat.dtype, outputs=len(trainables))
    return _shaped(b, parts, trainables, padded, rows)


def _shaped(b: Builder, parts, trainables, padded: list[int], rows: int) -> dict:
    """{name: [rows, *shape] (or [*shape] for rows 0)} of one [rows, padded numel] part per trainable."""
    out = {}
    for part, tr, pad in zip(parts, trainables, padded):
        if pad != tr.tensor.numel:
            part = b.op("Slice", [part, np.array([0], np.int64), np.array([tr.tensor.numel], np.int64),
                                  np.array([1], np.int64)], dtype=part.dtype)
        out[tr.name] = b.op("Reshape", [part, np.array([rows] + tr.shape if rows else tr.shape, np.int64)],
                            dtype=part.dtype)
    return out


def run(graph: gs.Graph, ctx: Context) -> gs.Graph:
    spec = ctx.spec
    b = Builder(graph, "prng")
    seed, step = gs.Variable("seed", dtype=np.int32, shape=[]), gs.Variable("step", dtype=np.int32, shape=[])
    graph.inputs += [seed, step]
    sizes = [tr.tensor.numel for tr in ctx.trainables]
    parts, padded = _z(b, seed, step, spec, sizes, range(spec.m))
    z = _shaped(b, parts, ctx.trainables, padded, spec.m)
    ctx.perturbations = Perturbations(seed, step, z, {})
    ctx.perturbations.z_at, ctx.perturbations.momentum_at = drawer(seed, step, spec, ctx.trainables)
    ctx.perturbations.z_words = words_drawer(b, seed, step, spec, ctx.trainables)
    ctx.perturbations.per_example = example_drawer(seed, step, spec)
    if spec.rounding == "stochastic":
        u, padded = _chunks(b, seed, step, sizes, range(spec.m, spec.m + 1), NOISE_BITS)
        u = b.op("BitwiseAnd", [u, np.array((1 << spec.lr_shift) - 1, np.int32)], dtype=np.int32)
        ctx.perturbations.round_noise = _split(b, u, ctx.trainables, padded, 0)
    if spec.sparsity > 0 and spec.sparse_mode in ("random", "topk"):
        u, padded = _chunks(b, seed, step, sizes, range(spec.m + 1, spec.m + 2), NOISE_BITS)
        ctx.perturbations.sparse_noise = _split(b, u, ctx.trainables, padded, 0)
    if spec.momentum > 0:
        c, padded = _chunks(b, seed, step, sizes, range(spec.m + 2, 2 * spec.m + 2), 8)
        ctx.perturbations.momentum_noise = _split(b, c, ctx.trainables, padded, spec.m)
    return graph


PASS = Pass("prng", run, reads=("trainables", "state"), adds=("perturbations",))
