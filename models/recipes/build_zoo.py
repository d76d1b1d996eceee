"""Build the shipped model zoo: data splits, fp32 models, and their QDQ-quantized variants.

Run from the repository root (needs torch 2.13.0 CPU and scikit-learn; the package itself needs neither):

    pip install torch==2.13.0 scikit-learn
    python models/recipes/build_zoo.py

Data: scikit-learn's bundled digits (1797 8x8 images, nothing downloaded). A fixed permutation splits it
into a *source* domain (pretraining) and a *target* domain: the same digits seen by a sensor mounted at an
angle (rotated 20 degrees) with a different gain and black level. The gap between source and target
accuracy is what on-device training must close.

Models (fp32 ONNX written by hand from the trained torch weights, opset 21, dynamic batch):
- digits_cnn: Conv(1->16) Relu Conv(16->32, stride 2) Relu Flatten Gemm(512->64) Relu Gemm(64->10)
- digits_attn: a one-block transformer over the 8 image rows: MatMul embedding, LayerNormalization,
  single-head attention (MatMul, Softmax), MLP, mean pool, MatMul classifier (MatMul/Add-only path)

Each is quantized with onnxruntime.quantization.quantize_static (QDQ, per-channel weights, uint8
activations) as w8a8 (int8 weights) and w16a8 (int16 weights); the transformer's attention scaling and
Softmax stay float (KEEP_FLOAT) so that onnxruntime's optimization levels compute the same forward. models/manifest.json records sizes and
accuracies measured with onnxruntime; tests check the shipped files still reach them.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)
from scipy.ndimage import rotate
from sklearn.datasets import load_digits

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPSET = 21
SEED = 0


# ----------------------------------------------------------------------------------------------- data
def sensor_shift(images: np.ndarray) -> np.ndarray:
    """The target device's view: mounted 20 degrees off, lower gain, raised black level."""
    rotated = np.stack([rotate(im, 20.0, reshape=False, order=1) for im in images])
    return np.clip(0.8 * rotated + 0.15, 0.0, 1.0)


def make_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(SEED).permutation(len(x))
    src, tgt = perm[:1000], perm[1000:]
    xt = sensor_shift(x[tgt]).astype(np.float32)
    as_nchw = lambda a: np.ascontiguousarray(a[:, None, :, :], dtype=np.float32)
    return {
        "source_train": (as_nchw(x[src[:800]]), y[src[:800]]),
        "source_test": (as_nchw(x[src[800:]]), y[src[800:]]),
        "target_train": (as_nchw(xt[:500]), y[tgt[:500]]),
        "target_test": (as_nchw(xt[500:]), y[tgt[500:]]),
    }


# --------------------------------------------------------------------------------------------- models
class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(512, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


class DigitsAttn(nn.Module):
    """One transformer block over the 8 rows of the image (tokens of 8 pixels)."""

    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.zeros(8, d))
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.mlp1 = nn.Linear(d, hidden)
        self.mlp2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, 10)
        self.d = d

    def forward(self, x):
        t = self.embed(x.reshape(-1, 8, 8)) + self.pos
        h = self.ln1(t)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / self.d ** 0.5, dim=-1)
        t = t + self.o(att @ self.v(h))
        t = t + self.mlp2(torch.relu(self.mlp1(self.ln2(t))))
        return self.head(t.mean(dim=1))


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float) -> nn.Module:
    torch.manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr)
    xs, ys = torch.tensor(x), torch.tensor(y)
    for _ in range(epochs):
        perm = torch.randperm(len(xs))
        for b in range(0, len(xs), 32):
            i = perm[b:b + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs[i]), ys[i]).backward()
            opt.step()
    return model.eval()


# ------------------------------------------------------------------------------ fp32 ONNX by hand
class OnnxWriter:
    """Just enough graph building to write the two architectures as plain fp32 ONNX."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=array.dtype), name))
        return name

    def op(self, op_type, inputs, name, **attrs):
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def linear_matmul(self, x, lin: nn.Linear, name):
        w = self.init(f"{name}.weight", lin.weight.detach().numpy().T.copy())
        b = self.init(f"{name}.bias", lin.bias.detach().numpy())
        return self.op("Add", [self.op("MatMul", [x, w], f"{name}.matmul"), b], f"{name}.out")

    def model(self, out, in_shape=(1, 8, 8), outputs=10):
        graph = helper.make_graph(
            self.nodes, "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *in_shape])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", outputs])],
            self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="fgcompile-zoo")
        model.ir_version = 10
        onnx.checker.check_model(model, full_check=True)
        return model


def cnn_to_onnx(m: DigitsCNN) -> onnx.ModelProto:
    g = OnnxWriter()
    p = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    h = g.op("Conv", ["x", g.init("conv1.weight", p["conv1.weight"]), g.init("conv1.bias", p["conv1.bias"])],
             "conv1", pads=[1, 1, 1, 1])
    h = g.op("Relu", [h], "relu1")
    h = g.op("Conv", [h, g.init("conv2.weight", p["conv2.weight"]), g.init("conv2.bias", p["conv2.bias"])],
             "conv2", pads=[1, 1, 1, 1], strides=[2, 2])
    h = g.op("Flatten", [g.op("Relu", [h], "relu2")], "flatten", axis=1)
    h = g.op("Gemm", [h, g.init("fc1.weight", p["fc1.weight"]), g.init("fc1.bias", p["fc1.bias"])],
             "fc1", transB=1)
    h = g.op("Relu", [h], "relu3")
    g.op("Gemm", [h, g.init("fc2.weight", p["fc2.weight"]), g.init("fc2.bias", p["fc2.bias"])],
         "logits", transB=1)
    return g.model("logits")


def attn_to_onnx(m: DigitsAttn) -> onnx.ModelProto:
    g = OnnxWriter()
    x = g.op("Reshape", ["x", g.init("tokens_shape", np.array([-1, 8, 8], np.int64))], "tokens")
    t = g.op("Add", [g.linear_matmul(x, m.embed, "embed"), g.init("pos", m.pos.detach().numpy())], "embed.pos")

    def layernorm(x, ln, name):
        return g.op("LayerNormalization", [x, g.init(f"{name}.weight", ln.weight.detach().numpy()),
                                           g.init(f"{name}.bias", ln.bias.detach().numpy())],
                    name, axis=-1, epsilon=ln.eps)

    h = layernorm(t, m.ln1, "ln1")
    q, k, v = (g.linear_matmul(h, lin, n) for lin, n in ((m.q, "q"), (m.k, "k"), (m.v, "v")))
    kt = g.op("Transpose", [k], "k.T", perm=[0, 2, 1])
    scores = g.op("Mul", [g.op("MatMul", [q, kt], "qk"),
                          g.init("att_scale", np.array(1.0 / m.d ** 0.5, np.float32))], "qk.scaled")
    att = g.op("Softmax", [scores], "att", axis=-1)
    t = g.op("Add", [t, g.linear_matmul(g.op("MatMul", [att, v], "att.v"), m.o, "o")], "res1")
    h = g.op("Relu", [g.linear_matmul(layernorm(t, m.ln2, "ln2"), m.mlp1, "mlp1")], "mlp.relu")
    t = g.op("Add", [t, g.linear_matmul(h, m.mlp2, "mlp2")], "res2")
    pooled = g.op("ReduceMean", [t, g.init("pool_axes", np.array([1], np.int64))], "pool", keepdims=0)
    g.linear_matmul(pooled, m.head, "head")
    g.nodes[-1].output[0] = "logits"
    return g.model("logits")


# ------------------------------------------------------------------------------------- quantization
class Calibration(CalibrationDataReader):
    def __init__(self, x: np.ndarray, batch: int = 50):
        self.batches = iter([{"x": x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


# Nodes left in float. With the attention's score scaling and Softmax quantized, onnxruntime fuses
# DQ→Softmax→Q into com.microsoft.QLinearSoftmax (a lookup table) at its default optimization level: it
# rounds 7-9% of the attention weights one uint8 step away from the unfused graph (and the ONNX reference
# evaluator, and OpenVINO), which flipped loss differences from the first training steps. Unfused, every
# runtime computes the same Softmax→Q.
KEEP_FLOAT = {"digits_cnn": [], "digits_attn": ["qk.scaled", "att"]}


def quantize(fp32_path: pathlib.Path, out_path: pathlib.Path, calib_x: np.ndarray, weight_type: QuantType,
             keep_float: list[str]):
    quantize_static(str(fp32_path), str(out_path), Calibration(calib_x), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=weight_type,
                    nodes_to_exclude=keep_float)


def accuracy(path: pathlib.Path, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"x": x})[0]
    return float((logits.argmax(1) == y).mean())


def main():
    splits = make_splits()
    data_dir = ROOT / "data"
    data_dir.mkdir(exist_ok=True)
    for name, (x, y) in splits.items():
        np.savez_compressed(data_dir / f"digits_{name}.npz", x=x, y=y)

    xs, ys = splits["source_train"]
    builds = {
        "digits_cnn": (lambda: cnn_to_onnx(train(DigitsCNN(), xs, ys, epochs=60, lr=1e-3))),
        "digits_attn": (lambda: attn_to_onnx(train(DigitsAttn(), xs, ys, epochs=150, lr=2e-3))),
    }
    manifest = {"default": "digits_cnn", "data": {}, "models": {}}
    for split in splits:
        manifest["data"][split] = f"data/digits_{split}.npz"
    for name, build in builds.items():
        out = ROOT / name
        out.mkdir(exist_ok=True)
        onnx.save(build(), out / "fp32.onnx")
        quantize(out / "fp32.onnx", out / "w8a8.onnx", xs[:400], QuantType.QInt8, KEEP_FLOAT[name])
        quantize(out / "fp32.onnx", out / "w16a8.onnx", xs[:400], QuantType.QInt16, KEEP_FLOAT[name])
        entry = {"source": "models/recipes/build_zoo.py", "data": "scikit-learn digits", "variants": {}}
        for variant in ("fp32", "w8a8", "w16a8"):
            path = out / f"{variant}.onnx"
            entry["variants"][variant] = {
                "file": f"{name}/{variant}.onnx",
                "bytes": path.stat().st_size,
                "source_test_accuracy": accuracy(path, *splits["source_test"]),
                "target_test_accuracy": accuracy(path, *splits["target_test"]),
            }
        manifest["models"][name] = entry
        print(name, json.dumps(entry["variants"], indent=1))
    # keep the entries other recipes wrote (kws_model.py adds kws_dscnn)
    previous = json.loads((ROOT / "manifest.json").read_text())["models"] if (ROOT / "manifest.json").exists() else {}
    manifest["models"].update({k: v for k, v in previous.items() if k not in manifest["models"]})
    (ROOT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
