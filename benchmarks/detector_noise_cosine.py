"""How well node perturbation's step points at the detector's gradient at depth: the cosine between the
weight step of kws_detect's block2.pw (a 1x1 Conv, 32 channels x 130 positions, then Relu, a mean over the
positions and the one-logit fc) and its exact gradient, at the pretrained fp32 point, per batch of 32.

    pip install -e '.[bench]'
    python benchmarks/detector_noise_cosine.py     # ~1 min

Two noise forms, both the weighed sign of each example's loss difference (sign(d_b)·|e_b|, e_b = sigmoid(z_b) − y_b,
as node's detector step) times the noise, correlated with the layer's clean input:
- per unit (node today): independent noise at each channel and position, 4160 perturbed units per example;
- per channel: one noise value per (example, channel), shared by the channel's positions, and the step reads
  the Relu's mask at each position. After a Relu and a mean over positions the loss gradient at a position is
  mask · (the channel's), so this form is unbiased here and perturbs 32 units per example; where a layer is
  not followed by that (a pooling window, a token mixer) it is biased.
The loss difference is taken to first order (d = the directional derivative), as for a small ε.
"""
from __future__ import annotations

import sys
import pathlib

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import backprop  # noqa: E402
from fgcompile import models, modelio  # noqa: E402

BATCHES, BATCH, MS = 40, 32, (8, 16, 32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def main() -> None:
    entry = models.manifest()["models"]["kws_detect"]["variants"]
    fp32 = modelio.load_model(models.path(entry["fp32"]["file"]))
    x, y = models.split("kws_detect", "target_train")
    net = backprop.OnnxTorch(fp32, ["block2.pw.weight", "block2.pw.bias", "fc.weight", "fc.bias"], output="logits")
    inputs = net.frozen(torch.tensor(x))["block2.dw.relu"].numpy()
    inputs = inputs.reshape(len(x), inputs.shape[1], -1)                       # [N, K, P]
    w = net.tensor("block2.pw.weight").reshape(-1, inputs.shape[1])           # [C, K] (1x1 kernels)
    bias, fc, fc_bias = net.tensor("block2.pw.bias"), net.tensor("fc.weight").reshape(-1), net.tensor("fc.bias")[0]
    rng = np.random.default_rng(0)
    rows = {(form, m): [] for form in ("per unit", "per channel") for m in MS}
    for _ in range(BATCHES):
        pick = rng.choice(len(x), BATCH, replace=False)
        a, label = inputs[pick], y[pick].astype(np.float64)
        out = np.einsum("ck,bkp->bcp", w, a) + bias[None, :, None]
        mask = (out > 0).astype(np.float64)
        e = 1 / (1 + np.exp(-(np.maximum(out, 0).mean(2) @ fc + fc_bias))) - label       # [B]
        delta = e[:, None, None] * fc[None, :, None] * mask / out.shape[2]               # dL/d(out) [B, C, P]
        exact = np.einsum("bcp,bkp->ck", delta, a)
        for m in MS:
            u = rng.standard_normal((m, *delta.shape))
            s = np.sign(np.einsum("bcp,ibcp->ib", delta, u)) * np.abs(e)
            rows["per unit", m].append(cosine(np.einsum("ib,ibcp,bkp->ck", s, u, a), exact))
            u = rng.standard_normal((m, *delta.shape[:2]))
            s = np.sign(np.einsum("bc,ibc->ib", delta.sum(2), u)) * np.abs(e)
            rows["per channel", m].append(cosine(np.einsum("ib,ibc,bcp,bkp->ck", s, u, mask, a), exact))
    print(f"kws_detect block2.pw ({delta.shape[1]} channels x {delta.shape[2]} positions), {BATCHES} batches of "
          f"{BATCH}: cosine of the step with the exact gradient, mean ± std\n")
    print("| noise | " + " | ".join(f"m = {m}" for m in MS) + " |")
    print("|---|" + "---|" * len(MS))
    for form in ("per unit", "per channel"):
        print(f"| {form} | " + " | ".join(f"{np.mean(rows[form, m]):.2f} ± {np.std(rows[form, m]):.2f}" for m in MS)
              + " |")


if __name__ == "__main__":
    main()
