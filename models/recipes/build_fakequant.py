"""Build a torch fake-quant ResNet-18 exported through TorchScript, the shape issue #31 met in the wild.

    python -m venv /tmp/torch && /tmp/torch/bin/pip install torch==2.13.0 onnx numpy
    /tmp/torch/bin/python models/recipes/build_fakequant.py [OUT.onnx]   (default tests/data/resnet18_fakequant.onnx)

torch is needed here only (a recipe venv; fgcompile never imports it). The model is ResNet-18's layout
written by hand (torchvision is not needed): a 3x3 stem, four stages of two BasicBlocks (widths 4, 8, 16,
32; the first block of stages 2-4 strides 2 and has a 1x1 downsample Conv), global average pooling and a
Linear: 20 Conv and a Gemm, the 21 products of ResNet-18. No BatchNorm (as after folding). It reads the
digits images [B, 1, 8, 8] and is trained for a few epochs on the source digits so that its weights mean
something (207 KB; float weights, as fake-quant exports store them).

Quantization is torch's fake-quant as QAT exports write it: every weight through
torch.fake_quantize_per_channel_affine (int8, symmetric, zero point 0, scale max|W|/127 per output
channel) and every activation through torch.fake_quantize_per_tensor_affine (uint8, scale from the
training data's maximum). torch.onnx.export(dynamo=False) writes each as QuantizeLinear → DequantizeLinear
on a float weight, and deduplicates equal zero points into one initializer that later readers reach
through Identity nodes. Everything is seeded; about 20 s on one core.
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[2]
WIDTHS = (4, 8, 16, 32)
EPOCHS = 8


class FakeQuantConv(nn.Module):
    """A Conv (or Linear) whose weight goes through per-channel int8 fake quantization once frozen."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv
        self.register_buffer("scale", torch.ones(conv.weight.shape[0]))
        self.register_buffer("zero_point", torch.zeros(conv.weight.shape[0], dtype=torch.int32))
        self.quantized = False

    def freeze(self):
        w = self.conv.weight.detach()
        self.scale = (w.abs().reshape(len(w), -1).amax(1) / 127).clamp_min(1e-8)
        self.quantized = True

    def forward(self, x):
        w = self.conv.weight
        if self.quantized:
            w = torch.fake_quantize_per_channel_affine(w, self.scale, self.zero_point, 0, -128, 127)
        if isinstance(self.conv, nn.Linear):
            return F.linear(x, w, self.conv.bias)
        return F.conv2d(x, w, self.conv.bias, self.conv.stride, self.conv.padding)


class Act(nn.Module):
    """Per-tensor uint8 fake quantization of an activation; its scale comes from the data once frozen."""

    def __init__(self):
        super().__init__()
        self.peak, self.quantized = 0.0, False

    def forward(self, x):
        if self.quantized:
            return torch.fake_quantize_per_tensor_affine(x, max(self.peak, 1e-6) / 255, 0, 0, 255)
        self.peak = max(self.peak, float(x.detach().max()))
        return x


def conv(cin, cout, k, stride=1):
    return FakeQuantConv(nn.Conv2d(cin, cout, k, stride, k // 2))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.act1 = conv(cin, cout, 3, stride), Act()
        self.conv2 = conv(cout, cout, 3)
        self.down = conv(cin, cout, 1, stride) if stride != 1 or cin != cout else None
        self.act2 = Act()

    def forward(self, x):
        h = self.conv2(self.act1(F.relu(self.conv1(x))))
        return self.act2(F.relu(h + (self.down(x) if self.down is not None else x)))


class ResNet18(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.inp, self.stem, self.act = Act(), conv(1, WIDTHS[0], 3), Act()
        blocks, cin = [], WIDTHS[0]
        for k, width in enumerate(WIDTHS):
            blocks += [Block(cin, width, 1 if k == 0 else 2), Block(width, width, 1)]
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.pool, self.fc, self.out = Act(), FakeQuantConv(nn.Linear(cin, classes)), Act()

    def forward(self, x):
        h = self.blocks(self.act(F.relu(self.stem(self.inp(x)))))
        return self.out(self.fc(self.pool(h.mean((2, 3)))))


def main(out: pathlib.Path):
    torch.manual_seed(0)
    d = np.load(ROOT / "models" / "data" / "digits_source_train.npz")
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    model = ResNet18()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        model(x)   # activation peaks on the training data
        for m in model.modules():
            if isinstance(m, (FakeQuantConv, Act)):
                m.freeze() if isinstance(m, FakeQuantConv) else setattr(m, "quantized", True)
        accuracy = float((model(x).argmax(1) == y).float().mean())
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (x[:1],), str(out), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    print(f"wrote {out} ({out.stat().st_size} bytes); fake-quant training accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "data" / "resnet18_fakequant.onnx")
