"""MeZO (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023, Algorithm 1):
the zeroth-order peer of fgcompile, in torch fp32. For each of m directions zᵢ ~ N(0, I), regenerated from
a seed instead of stored,

    L⁺ᵢ = L(θ + ε zᵢ),  L⁻ᵢ = L(θ − ε zᵢ),  gᵢ = (L⁺ᵢ − L⁻ᵢ) / 2ε,  then θ ← θ − η/m · Σᵢ gᵢ zᵢ

with θ perturbed and restored in place (+εz, −2εz, +εz), so a step holds no copy of θ: two forwards per
direction and inference memory plus one z tensor at a time. Float rounding makes the restore exact only
up to an ulp of ε·z (as in the paper's code).
"""
from __future__ import annotations

from typing import Callable

import torch


def _perturb(params: list[torch.Tensor], seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)     # the same zᵢ on every call with this seed
    for p in params:
        p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=scale)


@torch.no_grad()
def mezo_step(params: list[torch.Tensor], loss: Callable[[], float], m: int, eps: float, lr: float,
              seed: int) -> list[float]:
    """One MeZO step over m directions (seeds seed·m … seed·m + m − 1); returns the gᵢ. `loss` evaluates
    the model at the current (perturbed) params."""
    seeds = [seed * m + i for i in range(m)]
    grads = []
    for s in seeds:
        _perturb(params, s, eps)
        plus = float(loss())
        _perturb(params, s, -2 * eps)
        minus = float(loss())
        _perturb(params, s, eps)
        grads.append((plus - minus) / (2 * eps))
    for s, g in zip(seeds, grads):
        _perturb(params, s, -lr * g / m)
    return grads
