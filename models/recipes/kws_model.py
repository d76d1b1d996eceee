"""Build the keyword-spotting model: a DS-CNN pretrained on the clean source speech with noise
augmentation, written as fp32 ONNX and quantized w8a8 and w16a8 like the digits models.

Run from the repository root after kws_data.py (needs torch 2.13.0 CPU, scikit-learn and scipy):

    pip install -e '.[recipes]'
    python models/recipes/kws_data.py && python models/recipes/kws_model.py    # ~3 min on one core

DS-CNN (13.2k parameters once BatchNorm is folded into the convolutions on export):
  Conv(1->48, 9x3, stride 2) Relu, 4 x [depthwise Conv 3x3 Relu, pointwise Conv 1x1 Relu] (the first
  depthwise Conv strides 2 as well: 10x13 positions, the compute of the original DS-CNN on 10 MFCCs),
  ReduceMean over time and frequency, Gemm(48->10).

Noise augmentation: the source is clean (digital silence maps to feature 0), so a model trained on it
alone reads any noise floor as speech and collapses on the target device. `add_noise` mixes a random
flat noise floor (10-40 dB below the clip) into the features in the power domain, on 80% of the
training clips. It knows nothing of the device's band-pass,
reverb or hum. (A coloured floor with random tilt and boosted bands made the model so robust that the
device cost only 19 points; the issue asks for a gap of at least 20.)
"""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnxruntime.quantization import QuantType

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from build_zoo import OnnxWriter, accuracy, quantize  # noqa: E402
from kws_data import DB_HI, DB_LO, MELS  # noqa: E402

from fgcompile.runtime.data import load_data  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEED = 0
CHANNELS, BLOCKS = 48, 4
SPLITS = ("source_train", "source_test", "target_train", "target_test")


class DSCNN(nn.Module):
    def __init__(self, c: int = CHANNELS, blocks: int = BLOCKS, outputs: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, (9, 3), stride=2, padding=(4, 1)), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(c, c, 3, stride=2 if i == 0 else 1, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU()) for i in range(blocks))
        self.fc = nn.Linear(c, outputs)

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.fc(h.mean(dim=(2, 3)))


def add_noise(x: torch.Tensor, gen: torch.Generator, p: float = 0.8) -> torch.Tensor:
    """Mix a flat noise floor 10-40 dB below each clip's mean band power into features x (dB in
    [DB_LO, DB_HI] mapped to [0, 1]) in the power domain, with per-cell fluctuation like a periodogram's
    (exponential), on a share p of the clips."""
    to_power = lambda v: 10 ** ((v * (DB_HI - DB_LO) + DB_LO) / 10)
    power = to_power(x)
    level = power.sum(2, keepdim=True).mean(3, keepdim=True) / MELS              # [n,1,1,1] per band
    snr = 10 + 30 * torch.rand(len(x), 1, 1, 1, generator=gen)
    cells = -torch.log(torch.rand(x.shape, generator=gen).clamp_min(1e-6))        # exponential(1)
    noisy = 10 * torch.log10(power + level * 10 ** (-snr / 10) * cells)
    mixed = ((noisy - DB_LO) / (DB_HI - DB_LO)).clamp(0, 1)
    keep = torch.rand(len(x), 1, 1, 1, generator=gen) >= p
    return torch.where(keep, x, mixed)


def train(x: np.ndarray, y: np.ndarray, epochs: int = 30, lr: float = 3e-3, batch: int = 64, build=DSCNN,
          loss=nn.functional.cross_entropy) -> DSCNN:
    """Adam with a one-cycle rate on noise-augmented x: `build()` the model (after seeding), `loss(out, y)`."""
    torch.set_num_threads(1)   # on a busy 2-core machine, two threads ran 16x slower than one
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * ((len(x) + batch - 1) // batch))
    xs, ys = torch.tensor(x), torch.tensor(y)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xs), generator=gen)
        for b in range(0, len(xs), batch):
            i = perm[b:b + batch]
            opt.zero_grad()
            loss(model(add_noise(xs[i], gen)), ys[i]).backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{epochs}", flush=True)
    return model.eval()


def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """Conv then BatchNorm (eval) as one Conv: w' = w·γ/σ, b' = (b − μ)·γ/σ + β."""
    k = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    w = conv.weight.detach() * k.view(-1, 1, 1, 1)
    b = (conv.bias.detach() - bn.running_mean) * k + bn.bias.detach()
    return w.numpy().astype(np.float32), b.numpy().astype(np.float32)


def to_onnx(m: DSCNN, sigmoid: bool = False) -> onnx.ModelProto:
    """The folded DS-CNN as fp32 ONNX; sigmoid: a detector's head, Sigmoid on the Gemm's logits."""
    g = OnnxWriter()

    def conv(h, conv_mod, bn, name, **attrs):
        w, b = fold(conv_mod, bn)
        h = g.op("Conv", [h, g.init(f"{name}.weight", w), g.init(f"{name}.bias", b)], name, **attrs)
        return g.op("Relu", [h], f"{name}.relu")

    h = conv("x", m.stem[0], m.stem[1], "stem", kernel_shape=[9, 3], strides=[2, 2], pads=[4, 1, 4, 1])
    for i, blk in enumerate(m.blocks):
        stride = blk[0].stride[0]
        h = conv(h, blk[0], blk[1], f"block{i}.dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride],
                 group=blk[0].groups)
        h = conv(h, blk[3], blk[4], f"block{i}.pw", kernel_shape=[1, 1])
    h = g.op("ReduceMean", [h, g.init("pool_axes", np.array([2, 3], np.int64))], "pool", keepdims=0)
    out = g.op("Gemm", [h, g.init("fc.weight", m.fc.weight.detach().numpy()), g.init("fc.bias", m.fc.bias.detach().numpy())],
               "logits", transB=1)
    if sigmoid:
        out = g.op("Sigmoid", [out], "prob")
    return g.model(out, in_shape=(1, MELS, 49), outputs=m.fc.out_features)


def main():
    data = {s: load_data(ROOT / "data" / f"kws_{s}.npz") for s in SPLITS}
    xs, ys = data["source_train"]
    model = train(xs, ys)
    print(f"DS-CNN: {sum(p.numel() for p in model.parameters() if p.requires_grad)} trained parameters "
          "(BatchNorm folded on export)")
    entry = {"source": "models/recipes/kws_model.py", "data": "espeak-ng speech (models/recipes/kws_data.py)",
             "splits": {s: f"data/kws_{s}.npz" for s in SPLITS}}
    write_variants("kws_dscnn", to_onnx(model), xs, entry, lambda path: {
        "source_test_accuracy": accuracy(path, *data["source_test"]),
        "target_test_accuracy": accuracy(path, *data["target_test"])})


def write_variants(name: str, model: onnx.ModelProto, xs: np.ndarray, entry: dict, measure) -> None:
    """Write NAME/fp32.onnx and its w8a8 and w16a8 quantizations, and record them in the manifest as
    models[NAME] = entry plus `variants`: each file's size and `measure(path)` (a dict)."""
    out = ROOT / name
    out.mkdir(exist_ok=True)
    onnx.save(model, out / "fp32.onnx")
    # calibrate on clean and noise-augmented source clips: the ranges the model was trained to see
    gen = torch.Generator().manual_seed(SEED + 1)
    calib = np.concatenate([xs[:200], add_noise(torch.tensor(xs[200:400]), gen, p=1.0).numpy()])
    quantize(out / "fp32.onnx", out / "w8a8.onnx", calib, QuantType.QInt8, [])
    quantize(out / "fp32.onnx", out / "w16a8.onnx", calib, QuantType.QInt16, [])
    entry = {**entry, "variants": {}}
    for variant in ("fp32", "w8a8", "w16a8"):
        path = out / f"{variant}.onnx"
        entry["variants"][variant] = {"file": f"{name}/{variant}.onnx", "bytes": path.stat().st_size, **measure(path)}
    print(json.dumps(entry["variants"], indent=1))
    manifest_path = ROOT / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["models"][name] = entry
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")

if __name__ == "__main__":
    main()
