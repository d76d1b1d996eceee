"""How far node perturbation trains the detector's `--last 2` in float, with nothing of the tool's integers:
kws_detect's block2.pw (a 1x1 Conv, 32 channels x 130 positions, Relu, a mean over positions) node-perturbed
at m = 8 with each example's weighed sign (sign(d_b)·|e_b|, e_b = sigmoid(z_b) − y_b, d to first order), its
step whitened per channel (P², ridge 0.1) and averaged over the positions; fc by its exact gradient, whitened.
Each layer has its own rate (the tool has one), under the cosine schedule, 30 epochs, batch 32, 3 seeds;
trained through the deployed activation ranges (block2.pw's Relu and the pool clip where the int8 model
does) and scored on the target test split with them quantized as deployed.

    pip install -e '.[bench]'
    python benchmarks/detector_float_node.py     # ~25 min

Rows: the rates that trained best on seed 0 at 10 epochs (fc 0.25-16 × block2.pw 64-4096, scored on the test
split: an oracle's choice), then the same with each of the tool's integer effects, one at a time and together,
and with block2.pw's bias frozen (the tool's bias steps ~40x slower than the weights' by this
scale: its ĝ_bias counts the constant input 1 in the output's units, not in the whitened input's).
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import torch
from onnx import numpy_helper

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import backprop  # noqa: E402
from fgcompile import modelio, models  # noqa: E402
from fgcompile.passes.precondition import STEP_RIDGE, whitening  # noqa: E402
from fgcompile.runtime.metrics import miss_rate_at, roc_auc  # noqa: E402

M, EPOCHS, BATCH, SEEDS = 8, 30, 32, (0, 1, 2)
LR_FC, LR_PW = 0.25, 256.0


def features(split: str, net) -> tuple[np.ndarray, np.ndarray]:
    """(block2.pw's input [N, K, P], labels) of a target split."""
    x, y = models.split("kws_detect", split)
    a = net.frozen(torch.tensor(x))["block2.dw.relu"].numpy()
    return a.reshape(len(x), a.shape[1], -1).astype(np.float64), y.astype(np.float64)


class Detector:
    """block2.pw → Relu (clipped at its deployed range) → mean over positions (clipped) → fc, in float64."""

    def __init__(self):
        entry = models.manifest()["models"]["kws_detect"]["variants"]
        fp32 = modelio.load_model(models.path(entry["fp32"]["file"]))
        net = backprop.OnnxTorch(fp32, ["block2.pw.weight", "block2.pw.bias", "fc.weight", "fc.bias"], output="logits")
        self.train, self.test = features("target_train", net), features("target_test", net)
        k = self.train[0].shape[1]
        self.w0 = net.tensor("block2.pw.weight").reshape(-1, k).astype(np.float64)
        self.b0 = net.tensor("block2.pw.bias").astype(np.float64)
        self.f0 = net.tensor("fc.weight").reshape(-1).astype(np.float64)
        self.fb0 = float(net.tensor("fc.bias")[0])
        int8 = modelio.load_model(models.path(entry["w8a8"]["file"]))
        inits = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
        self.relu_scale, self.pool_scale = float(inits["block2.pw.relu_scale"]), float(inits["pool_scale"])
        a = self.train[0]
        self.p2 = np.linalg.matrix_power(whitening(a.transpose(0, 2, 1).reshape(-1, k), STEP_RIDGE), 2)
        _, _, pooled = self.forward(self.w0, self.b0, a)
        self.pf2 = np.linalg.matrix_power(whitening(pooled, STEP_RIDGE), 2)

    @staticmethod
    def pre_activation(w, b, a):
        """block2.pw's output [B, C, P] before its Relu."""
        return np.einsum("ck,bkp->bcp", w, a) + b[None, :, None]

    def forward(self, w, b, a):
        """(pre-activation [B, C, P], its live mask (dL/d through Relu and both clips), pooled [B, C])."""
        out = self.pre_activation(w, b, a)
        top = 255 * self.relu_scale
        raw = np.clip(out, 0, top).mean(2)
        live = (out > 0) & (out < top) & (raw < 255 * self.pool_scale)[:, :, None]
        return out, live, np.minimum(raw, 255 * self.pool_scale)

    def chain(self, w, b, f, fb, a, y):
        """(e [B] = sigmoid(z) − y, dL/d(out) [B, C, P] of the summed logistic loss, pooled [B, C])."""
        out, live, pooled = self.forward(w, b, a)
        e = 1 / (1 + np.exp(-(pooled @ f + fb))) - y
        return e, e[:, None, None] * f[None, :, None] * live / out.shape[2], pooled

    def quantized_logits(self, out, f, fb, pool_rounding: bool = True):
        """The logit [B] with block2.pw's output requantized and the pool requantized, as the int8 graph
        computes it (a perturbation of one output LSB survives the first, not always the second); without
        pool_rounding the pool is read in float (clipped to its range)."""
        r = np.clip(np.round(out / self.relu_scale), 0, 255) * self.relu_scale
        pooled = r.mean(2) / self.pool_scale
        return np.clip(np.round(pooled) if pool_rounding else pooled, 0, 255) * self.pool_scale @ f + fb

    def score(self, w, b, f, fb) -> tuple[float, float]:
        """(AUC, miss rate at 5% false alarms: the tool's metrics) on the test split, activations quantized as
        deployed."""
        a, y = self.test
        z = self.quantized_logits(self.pre_activation(w, b, a), f, fb)
        return roc_auc(z, y), miss_rate_at(z, y)

    def quantized_loss(self, out, f, fb, y, pool_rounding: bool = True):
        """Each example's logistic loss on quantized_logits."""
        z = self.quantized_logits(out, f, fb, pool_rounding)
        return np.logaddexp(0, z) - y * z

    def fit(self, seed: int, lr_fc: float, lr_pw: float, epochs: int = EPOCHS, pw_bias: bool = True,
            tool_v: bool = False, quantized_signs: bool = False, int8_white: bool = False,
            grid: float | None = None, tool_e: bool = False) -> tuple[float, float]:
        rng = np.random.default_rng(seed)
        w, b, f, fb = self.w0.copy(), self.b0.copy(), self.f0.copy(), self.fb0
        a_all, y_all = self.train
        per_epoch = len(y_all) // BATCH
        steps, t = epochs * per_epoch, 0
        for _ in range(epochs):
            order = rng.permutation(len(y_all))
            for s in range(per_epoch):
                pick = order[s * BATCH:(s + 1) * BATCH]
                a, y = a_all[pick], y_all[pick]
                e, delta, pooled = self.chain(w, b, f, fb, a, y)
                u = rng.choice([-1.0, 1.0], size=(M, *delta.shape))
                if quantized_signs:    # d from the ± forwards through the int8 activations, ±1 output LSB
                    out = self.pre_activation(w, b, a)
                    signs = np.sign(np.array([self.quantized_loss(out + self.relu_scale * ui, f, fb, y) -
                                              self.quantized_loss(out - self.relu_scale * ui, f, fb, y) for ui in u]))
                else:
                    signs = np.sign(np.einsum("bcp,ibcp->ib", delta, u))
                if tool_v:     # the tool's int8 V: |e| on 2^-7, the weighed sum rounded half away from 0
                    v = np.einsum("ib,ibcp->bcp", signs, u) * np.round(np.abs(e) * 128)[:, None, None] / (2 * M)
                    v = np.sign(v) * np.floor(np.abs(v) + 0.5) / 128
                else:
                    v = np.einsum("ib,ibcp->bcp", signs * np.abs(e), u) / (2 * M)
                positions = delta.shape[2]
                eta = 0.5 * (1 + np.cos(np.pi * t / steps))
                t += 1
                white = a.transpose(0, 2, 1) @ self.p2                            # [B, P, K]: a·P²
                if int8_white:               # the tool's int8 a': rms 32 LSBs, saturating at 127 (~4 rms)
                    rms = np.sqrt((white ** 2).mean())
                    white = np.clip(np.round(white / rms * 32), -128, 127) * rms / 32
                step = eta * lr_pw * np.einsum("bcp,bpk->ck", v, white) / positions / BATCH
                if grid is not None:         # the weight grid: a step rounds to whole LSBs of grid·max|W0_c|
                    lsb = np.abs(self.w0).max(1, keepdims=True) * grid
                    step = np.round(step / lsb) * lsb
                w -= step
                if pw_bias:
                    b -= eta * lr_pw * v.sum((0, 2)) / positions / BATCH
                e_fc = np.round(e * 128) / 128 if tool_e else e     # the tool's exact step: e as int8 on 2^-7
                f -= eta * lr_fc * (e_fc @ pooled / BATCH) @ self.pf2
                fb -= eta * lr_fc * e_fc.mean()
        return self.score(w, b, f, fb)


def sign_agreement(d: Detector, batches: int = 20) -> tuple[float, float]:
    """The share of node's signs (d from the ± forwards through the int8 activations, ±1 output LSB) that agree
    with the first-order ones at the pretrained point: with the pool requantized as deployed, and read in float."""
    rng = np.random.default_rng(0)
    a_all, y_all = d.train
    agree = []
    for _ in range(batches):
        pick = rng.choice(len(y_all), BATCH, replace=False)
        a, y = a_all[pick], y_all[pick]
        _, delta, _ = d.chain(d.w0, d.b0, d.f0, d.fb0, a, y)
        out = d.pre_activation(d.w0, d.b0, a)
        u = rng.choice([-1.0, 1.0], size=(M, *delta.shape))
        first = np.sign(np.einsum("bcp,ibcp->ib", delta, u))
        signs = [np.sign([d.quantized_loss(out + d.relu_scale * ui, d.f0, d.fb0, y, rounding) -
                          d.quantized_loss(out - d.relu_scale * ui, d.f0, d.fb0, y, rounding) for ui in u])
                 for rounding in (True, False)]
        agree.append([(s == first).mean() for s in signs])
    return tuple(np.mean(agree, axis=0))


def main() -> None:
    d = Detector()
    auc, miss = d.score(d.w0, d.b0, d.f0, d.fb0)
    print(f"kws_detect, float node --last 2 (m = {M}, {EPOCHS} epochs, seeds {SEEDS}); untrained AUC {auc:.4f}, "
          f"miss {100 * miss:.1f}%\n")
    print("| block2.pw + fc | lr fc / block2.pw | AUC | miss @ 5% FA |")
    print("|---|---|---|---|")
    tool = {"quantized_signs": True, "int8_white": True, "tool_v": True, "grid": 1 / 254}
    rows = [("node, weighed signs (float V, d to first order)", {}),
            ("d from the ± forwards through the int8 activations", {"quantized_signs": True}),
            ("a·P² as the tool's int8 a' (rms 32, saturating at 127)", {"int8_white": True}),
            ("V weighed and rounded as the tool's", {"tool_v": True}),
            ("steps rounded to the weight grid (headroom 128: max|W_c| / 254)", {"grid": 1 / 254}),
            ("all four of the tool's integer effects", tool),
            ("all four, block2.pw's bias frozen", {**tool, "pw_bias": False}),
            ("fc's exact step with e as int8 on 2^-7", {"tool_e": True}),
            ("all of the above", {**tool, "pw_bias": False, "tool_e": True})]
    for label, options in rows:
        runs = np.array([d.fit(seed, LR_FC, LR_PW, **options) for seed in SEEDS])
        print(f"| {label} | {LR_FC:g} / {LR_PW:g} | {runs[:, 0].mean():.4f} | {100 * runs[:, 1].mean():.1f}% |",
              flush=True)
    quantized, floated = sign_agreement(d)
    print(f"\nnode's signs that agree with the first-order ones at the pretrained point: {100 * quantized:.0f}% with "
          f"the pool requantized, {100 * floated:.0f}% with it read in float")


if __name__ == "__main__":
    main()
