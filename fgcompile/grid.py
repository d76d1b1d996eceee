"""The training grid of a trained weight, and the way back to the deployed grid: one grid transform.

Widening (compile time) moves a symmetric integer weight W (scale s) to a training grid with F times the
resolution and H times the range of the pretrained values ("headroom"):

    W_t = F · W,   s_t = s / F                        (DQ(W_t) == DQ(W) exactly when F >= 1: a power of two)
    int8,  --bits 16:  F = 256 / H, int16, range [F·H·qmin8, F·H·qmax8]   (H = 1: [−32768, 32639])
    int8,  --bits 8:   F = 1,       int16 when H > 1, range [H·qmin8, H·qmax8]
    uint8, --bits 16:  F = 256,     uint16, range [0, 65407], zp_t = 256·zp  (asymmetric: no headroom)
    int16:             F = 1 / H,   int16, W_t = round_half_away(W / H)   (the int16 range at scale H·s)
An int16 weight cannot widen to int32 (onnxruntime fuses an int32 DequantizeLinear into QGemm and then
rejects the graph), so it trains on a coarser int16 grid: 16 − log2(H) bits, as int8 at --bits 16, and
its start moves by at most half a grid step (2^−16·H of the channel's range).

Without headroom no weight can grow past the largest pretrained value of its channel; backprop has no
such cap. Narrowing (export) goes back to the deployed dtype on the deployed scale, refitting a channel's
scale only when its trained values no longer fit:

    s_d = s while the channel fits (round_half_away(DQ(W_t) / s) within the dtype), else max|DQ(W_t)| / qmax
    W_d = sign(q) · floor(|q| + 1/2),  q = DQ(W_t) / s_d   (round half away from zero)
A bias tied to its weight's scale (s_b = s_in · s_w) follows: s_b,d = s_b · s_d / s, b_d = round(b / s_b,d).
A channel that still fits its deployed scale narrows in integers, the inverse of widen():
    W_d = clip(sign(W_t) · ((|W_t| + F/2) div F))
passes/widen.py widens, runtime/export.py narrows; both take the formulas from here.
"""
from __future__ import annotations

import dataclasses

import numpy as np

WIDENING = 256   # 8 -> 16 bits: the finest training grid of an 8-bit weight (F without headroom)
RANGE = {"int8": (-128, 127), "int16": (-32768, 32767)}
LEGACY_WIDE_RANGE = (-32768, 127 * WIDENING + WIDENING // 2 - 1)   # H = 1: every value still narrows to int8 unclipped
# the widenings fgcompile makes (source -> training dtype), and the largest value that still narrows back
WIDENED_QMAX = {("int8", "int16"): LEGACY_WIDE_RANGE[1], ("uint8", "uint16"): 255 * WIDENING + WIDENING // 2 - 1,
                ("int32", "int32"): np.iinfo(np.int32).max, ("int16", "int16"): np.iinfo(np.int16).max}


@dataclasses.dataclass(frozen=True)
class TrainingGrid:
    dtype: str
    factor: float        # F: training LSBs per source LSB (a power of two; below 1 for int16 with headroom)
    qmin: int
    qmax: int


def training_grid(source_dtype: str, bits: int, headroom: int) -> TrainingGrid | None:
    """The grid a symmetric `source_dtype` weight trains on, or None when it trains as it is."""
    if source_dtype == "uint8" and bits == 16:   # asymmetric weights: finer only (zp_t = 256·zp)
        return TrainingGrid("uint16", WIDENING, 0, WIDENED_QMAX["uint8", "uint16"])
    if source_dtype == "int8" and bits == 16:
        f = WIDENING // headroom
        lo, hi = LEGACY_WIDE_RANGE if headroom == 1 else (-128 * f * headroom, 127 * f * headroom)
        return TrainingGrid("int16", f, lo, hi)
    if headroom == 1 or source_dtype not in RANGE:
        return None
    lo, hi = RANGE[source_dtype]
    if source_dtype == "int16":
        return TrainingGrid("int16", 1 / headroom, lo, hi)
    return TrainingGrid("int16", 1, lo * headroom, hi * headroom)


def resolution_bits(state: list) -> int:
    """Bits of the training grid per source range, from the contract's state entries (StateTensor):
    source bits + log2(F) of the trained weights (16 when no weight trains). The pipeline resolves ε and
    lr by it."""
    bits = [np.dtype(s.source_dtype).itemsize * 8 + int(np.log2(s.factor)) for s in state if s.role == "weight"]
    return max(bits) if bits else 16


def round_half_away(q: np.ndarray) -> np.ndarray:
    return np.sign(q) * np.floor(np.abs(q) + 0.5)


def widen(values, factor: float) -> np.ndarray:
    """W_t = F·W in int64 (exact for F >= 1), or round_half_away(F·W) for F < 1 (int16 with headroom)."""
    v = np.asarray(values).astype(np.int64)
    return v * int(factor) if factor >= 1 else round_half_away(v * factor).astype(np.int64)


def narrow(values: np.ndarray, dtype: str, factor: int = WIDENING) -> np.ndarray:
    """W = clip(round_half_away(W_t / F)) in integers: the inverse of widen() for an integer F >= 1."""
    v = values.astype(np.int64)
    q = np.sign(v) * ((np.abs(v) + factor // 2) // factor)
    info = np.iinfo(dtype)
    return np.clip(q, info.min, info.max).astype(dtype)


def per_channel(values: np.ndarray, axis: int | None) -> np.ndarray:
    """max |values| over every axis but `axis` (all axes when per-tensor), keeping dims for broadcasting."""
    axes = tuple(i for i in range(values.ndim) if i != axis) if axis is not None else None
    return np.abs(values).max(axis=axes, keepdims=True) if values.ndim else np.abs(values)


def deployed_scale(trained: np.ndarray, scale: np.ndarray, axis: int | None, dtype: str) -> np.ndarray:
    """s_d per channel, float32 shaped like `scale`: s while round_half_away(trained / s) stays in `dtype`,
    else max|trained| / qmax (a refit that never clips)."""
    s = np.asarray(scale, np.float32)
    info = np.iinfo(dtype)
    shape = [1] * trained.ndim
    if axis is not None:
        shape[axis] = -1
    q = trained / s.astype(np.float64).reshape(shape if axis is not None and s.size > 1 else ())
    fits = (per_channel(np.maximum(q, 0), axis) < info.max + 0.5) & (per_channel(np.minimum(q, 0), axis) < -info.min + 0.5)
    peak = per_channel(trained, axis)
    return np.where(fits.reshape(s.shape), s, (peak.reshape(s.shape) / info.max).astype(np.float32)).astype(np.float32)


def requantize(trained: np.ndarray, scale_d: np.ndarray, axis: int | None, dtype: str) -> np.ndarray:
    """round_half_away(trained / s_d), saturated to `dtype` (float64 arithmetic)."""
    s = np.asarray(scale_d, np.float64)
    if axis is not None and s.size > 1:
        shape = [1] * trained.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    info = np.iinfo(dtype)
    return np.clip(round_half_away(trained / s), info.min, info.max).astype(dtype)
