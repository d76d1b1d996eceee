"""The numbers several passes (and inspect) agree on: bias stride, coefficient and lr bounds, train bytes.

    bias stride  2^k, 2^k ≈ s_w / s_b = 1 / s_in, k in [0, 12]: one stride of an int32 bias moves the output
                 as much as one weight LSB on an input of 1.0
    c_max        1 (sign) or SPSA_CLIP (m-SPSA): the largest |cᵢ|
    train bytes  numel · (2·g + 18·rows + ĝ + copies·(12 + g)) beyond inference for one trained tensor on a
                 g-byte grid; stacked or cloned: rows = m z rows, copies = 2m, ĝ = 8; loop: rows = 1 (zᵢ is
                 drawn inside the Loop), copies = 1 (one branch per iteration), ĝ = 16 (carried through the
                 Loop: an iteration's input and output). A large tensor (more than CHUNK elements, no
                 --sharpness) is perturbed in its own dtype: loop numel · (4·g + 9); stacked
                 numel · (2·g + 4·m + 8 + copies·(2·g + 8)), copies = 2 for a Conv weight (its branch kernels
                 are built one at a time), else 2m; a momentum buffer
                 (--momentum, --sharpness) adds 16 (int32 state in and out, and its update), guided sampling
                 8·rows and the ascent 8 (fgcompile/inspection.py explains the terms; pair's --memory-budget
                 and inspect's estimate use it)
    lr_max       (2^31 − 1 − 2^s) // (m · c_max · z_max · gain): lr_numerator·ĝ never wraps int32, since
                 |ĝ| <= m·c_max·z_max·gain (gain: KERNEL_GAIN_MAX with --kernel-norm, else 1). Node and head
                 (ĝ has no static bound): LR_NUMERATOR_MAX, and the update saturates ĝ to
                 ±(2^31 − 1 − 2^s) // lr_numerator instead, so the rare ĝ near NODE_GRAD_MAX caps no rate
"""
from __future__ import annotations

import dataclasses

import numpy as np

SPSA_CLIP = 127
CHUNK_BITS = {"rademacher": 1, "ternary": 8, "gaussian": 8}   # hash bits per perturbation element (prng)
TIE_TOLERANCE = 2.0 ** -19   # |dᵢ| <= τ·max(|L⁺ᵢ|, |L⁻ᵢ|) is a tie (passes/estimate.py says why)
Z_MAX = {"rademacher": 1, "ternary": 1, "gaussian": 4}
KERNEL_GAIN_MAX = 16         # kernel-wise normalization scales a kernel's ĝ by at most this (passes/kernelnorm.py)


def bias_stride(weight_scale, bias_scale, widening: float = 1) -> int:
    """2**k with 2**k ≈ s_w / s_b (s_w / widening when the weight will be widened, for inspect's forecast)."""
    s_w = np.asarray(weight_scale, np.float64) / widening
    s_b = np.asarray(bias_scale, np.float64)
    k = int(np.round(np.log2(np.median(s_w / s_b))))
    return 1 << min(max(k, 0), 12)


def coefficient_bound(spec) -> int:
    return 1 if spec.estimator in ("sign", "node") else SPSA_CLIP


LR_NUMERATOR_MAX = (1 << 20) - 1   # TrainSpec.validate's bound on round(lr·2^s)


def lr_bound(spec) -> int:
    if saturates_at_rate(spec):
        return LR_NUMERATOR_MAX
    gain = KERNEL_GAIN_MAX if spec.kernel_norm else 1
    return update_room(spec.lr_shift) // (grad_bound(spec) * gain)


def update_room(lr_shift: int) -> int:
    """2^31 − 1 − 2^s: the largest |lr_numerator·ĝ| that the update's rounding keeps inside int32."""
    return 2 ** 31 - 1 - (1 << lr_shift)


def saturates_at_rate(spec) -> bool:
    """Node and head: the update saturates ĝ to ±update_room // lr_numerator (a static ĝ bound of 2^20 capped
    the rate at 2047/256, below where a lone Conv trains best: benchmarks/README.md, "One hidden layer by
    default")."""
    return spec.estimator in ("node", "head")


NODE_GRAD_MAX = 1 << 20   # the node estimator saturates ĝ here (passes/node.py): its sum over examples has no
                          # static bound (the update then saturates it again by the rate: saturates_at_rate)


def grad_bound(spec) -> int:
    """max |ĝ| = m·c_max·z_max, before kernel-wise normalization (the node estimator: its saturation)."""
    if spec.estimator in ("node", "head"):
        return NODE_GRAD_MAX
    return spec.m * coefficient_bound(spec) * Z_MAX[spec.perturbation]


def narrow_grad_dtype(spec) -> np.dtype:
    """The narrowest integer dtype that holds every ĝ (the loop form carries ĝ in it): int8 for
    Sign-m-SPSA with ±1 perturbations (|ĝ| <= m <= 64), int16 for m-SPSA (<= 64·127·4 < 2^15)."""
    bound = grad_bound(spec)
    return np.dtype(np.int8 if bound <= 127 else np.int16 if bound <= 32767 else np.int32)


def elements_per_word(spec) -> int:
    """Elements per 32-bit hash word of the perturbation (32 for ±1 bits, 4 for 8-bit chunks)."""
    return 32 // CHUNK_BITS[spec.perturbation]


CHUNK = 1 << 16     # elements per iteration of the loop form's chunked update (int32 temporaries: 256 KiB)


def compute_shape(shape) -> list[int]:
    """`shape` without its trailing size-1 axes (at least one axis): the view that elementwise integer
    arithmetic on a trained tensor runs on. onnxruntime broadcasts a scalar onto a shape ending in size-1
    axes one element at a time: on a 1x1 Conv kernel [Co, Ci, 1, 1] a Mul by a constant took ~100x as long
    as on [Co, Ci] (1.8 ms against 0.015 ms for 204800 int8 values). The view is free."""
    s = list(shape)
    while len(s) > 1 and s[-1] == 1:
        s.pop()
    return s


def chunked(shape) -> bool:
    """Whether the loop form updates a tensor of this shape in row chunks (more than CHUNK elements)."""
    return len(shape) > 0 and int(np.prod(shape)) > CHUNK


def chunk_rows(shape, align: int = 1, per_element: int = 1) -> int | None:
    """Rows of the leading axis per update chunk: the largest divisor of shape[0] whose rows hold at most
    CHUNK / per_element elements (per_element: int32 values a chunk holds per element, e.g. its m zᵢ) and
    a multiple of `align` (a chunk then starts on a hash word), or None."""
    inner = int(np.prod(shape[1:]))
    fits = [d for d in range(1, shape[0] + 1) if shape[0] % d == 0 and (d * inner) % align == 0
            and (d * inner * per_element <= CHUNK or d == 1)]
    return max(fits) if fits else None


def train_bytes(numel: int, grid_bytes: int, m: int, loop: bool = False, momentum: float = 0.0,
                sharpness: int = 0, conv: bool = False) -> int:
    buffer = 16 if momentum > 0 or sharpness > 0 else 0   # int32 v in and out, v div 8 and the sum
    ascent = 8 if sharpness > 0 else 0                    # sign(v) and the centre W̃, int32
    narrow = numel > CHUNK and sharpness == 0             # perturbed in its own dtype (pair._in_own_dtype)
    if loop and narrow:                                   # a large tensor of the loop form
        guided = 8 if momentum > 0 else 0                 # the int32 noise and the guided z of one row
        return numel * (4 * grid_bytes + 9 + buffer + guided)
    if narrow:          # stacked: int8 z, its rows and MatMulInteger's packed copy; a Conv builds one branch's
        guided = 8 * m if momentum > 0 else 0             # kernel at a time, other ops read all 2m at once
        return numel * (2 * grid_bytes + buffer + 4 * m + guided + 8 + (2 if conv else 2 * m) * (2 * grid_bytes + 8))
    rows, grad, copies = (1, 16, 1) if loop else (m, 8, 2 * m)
    guided = 8 * rows if momentum > 0 else 0              # per z row: the int32 noise and the Where's z
    return numel * (2 * grid_bytes + buffer + ascent + 18 * rows + guided + grad + copies * (12 + grid_bytes))


@dataclasses.dataclass(frozen=True)
class Patches:
    """A 2-D Conv's im2col geometry, shared by node's graph (passes/node.py) and its calibration
    (passes/precondition.py): row (b, y, x), column (c, i, j) of the patches is
    a[b, c, y·s_h + i·d_h − p_top, x·s_w + j·d_w − p_left], zero outside a."""
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]        # top, left, bottom, right (ONNX order)
    dilations: tuple[int, int]

    @classmethod
    def of_conv(cls, attrs: dict, weight_shape) -> "Patches":
        return cls(tuple(weight_shape[2:]), tuple(attrs.get("strides", [1, 1])),
                   tuple(attrs.get("pads", [0, 0, 0, 0])), tuple(attrs.get("dilations", [1, 1])))

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw), (pt, pl, pb, pr) = self.kernel, self.strides, self.dilations, self.pads
        return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1

    def indices(self, h: int, w: int) -> np.ndarray:
        """int64 [kh·kw, H'·W']: the flat index into the padded [H + pt + pb, W + pl + pr] image of kernel
        tap (i, j) at output position (y, x)."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        ho, wo = self.out_size(h, w)
        width = w + self.pads[1] + self.pads[3]
        rows = (np.arange(kh)[:, None, None, None] * dh + np.arange(ho)[None, None, :, None] * sh)
        cols = (np.arange(kw)[None, :, None, None] * dw + np.arange(wo)[None, None, None, :] * sw)
        return (rows * width + cols).reshape(kh * kw, ho * wo).astype(np.int64)

    def rows(self, a: np.ndarray) -> np.ndarray:
        """The patches of a [B, C, H, W] as rows [B·H'·W', C·kh·kw]."""
        n, c, h, w = a.shape
        pt, pl, pb, pr = self.pads
        padded = np.pad(a, ((0, 0), (0, 0), (pt, pb), (pl, pr))).reshape(n, c, -1)
        taken = padded[:, :, self.indices(h, w)]                       # [B, C, kh·kw, H'·W']
        return taken.reshape(n, -1, taken.shape[-1]).transpose(0, 2, 1).reshape(-1, taken.shape[1] * taken.shape[2])
