"""Build the deep-training benchmark models: architecture-faithful, randomly initialised, quantized.

    python models/recipes/build_bench.py [--out DIR] [--only NAME]      (default DIR ~/.cache/fgcompile-bench)

Writes DIR/<name>/{fp32,w8a8,w16a8}.onnx (outside git: ResNet-18 alone is 45 MB in fp32). Cost and
memory do not depend on the weights' values, so the weights are He-initialised random numbers (residual
branches scaled down so activations stay in range without batch norm, which inference exports fold
into the convolutions anyway). The graphs are written by hand, layer by layer as the papers give them:

    resnet18      3x96x96   ResNet-18 (BasicBlocks [2, 2, 2, 2], 7x7 stem, max pool), 10 classes
    mobilenetv2   3x96x96   MobileNetV2, width 0.5 (inverted residuals, ReLU6 as Clip), 10 classes
    dscnn         1x49x10   DS-CNN-S keyword spotter (10x4 stem, 4 depthwise-separable blocks), 12 classes
    vit           3x96x96   ViT-tiny-style encoder (16x16 patches, 12 blocks, d=192, 3 heads, GELU MLP)
    resnet50      3x224x224 ResNet-50 (Bottlenecks [3, 4, 6, 3]): only for compile time
    mobilenetv2_1000   3x96x96   MobileNetV2, width 1.0, 1000 classes  } real size, for
    resnet18_1000      3x96x96   ResNet-18, 1000 classes               } benchmarks/real_size.py
    resnet18_1000_224  3x224x224 ResNet-18, 1000 classes               }

Each is quantized with onnxruntime's quantize_static: QDQ, per-channel weights, uint8 activations,
int8 weights (w8a8) and int16 weights (w16a8), calibrated on random N(0, 1) inputs. Opset 21.
"""
from __future__ import annotations

import argparse
import pathlib
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

OPSET = 21
CACHE = pathlib.Path.home() / ".cache" / "fgcompile-bench"


class Net:
    """Writes an fp32 ONNX graph layer by layer with random weights."""

    def __init__(self, seed: int):
        self.nodes, self.inits, self.rng, self.n = [], [], np.random.default_rng(seed), 0

    def name(self, hint):
        self.n += 1
        return f"{hint}_{self.n}"

    def init(self, hint, array):
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type, inputs, hint=None, **attrs):
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x, cin, cout, k, stride=1, group=1, gain=1.0, hint="conv", pads=None):
        kh, kw = (k, k) if isinstance(k, int) else k
        fan_in = cin // group * kh * kw
        w = (self.rng.standard_normal((cout, cin // group, kh, kw)) * gain * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (self.rng.standard_normal(cout) * 0.01).astype(np.float32)
        if pads is None:
            pads = [(kh - 1) // 2, (kw - 1) // 2] * 2
        return self.op("Conv", [x, self.init(f"{hint}.weight", w), self.init(f"{hint}.bias", b)], hint,
                       kernel_shape=[kh, kw], strides=[stride, stride], pads=pads, group=group)

    def linear(self, x, din, dout, hint="fc", gemm=True):
        w = (self.rng.standard_normal((dout, din)) * np.sqrt(1.0 / din)).astype(np.float32)
        b = (self.rng.standard_normal(dout) * 0.01).astype(np.float32)
        if gemm:
            return self.op("Gemm", [x, self.init(f"{hint}.weight", w), self.init(f"{hint}.bias", b)], hint, transB=1)
        y = self.op("MatMul", [x, self.init(f"{hint}.weight", w.T.copy())], f"{hint}.matmul")
        return self.op("Add", [y, self.init(f"{hint}.bias", b)], hint)

    def relu(self, x):
        return self.op("Relu", [x])

    def relu6(self, x):
        return self.op("Clip", [x, self.init("zero", np.array(0, np.float32)), self.init("six", np.array(6, np.float32))])

    def head(self, x, c, classes):
        return self.linear(self.op("Flatten", [self.op("GlobalAveragePool", [x])], axis=1), c, classes)

    def model(self, out, in_shape, classes):
        graph = helper.make_graph(self.nodes, "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *in_shape])],
                                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", classes])],
                                  self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fgcompile-bench")
        model.ir_version = 10
        onnx.checker.check_model(model)
        return model


def resnet(blocks, bottleneck: bool, size: int, classes: int = 10) -> onnx.ModelProto:
    g = Net(18 if not bottleneck else 50)
    h = g.op("MaxPool", [g.relu(g.conv("x", 3, 64, 7, 2, hint="stem"))], kernel_shape=[3, 3], strides=[2, 2],
             pads=[1, 1, 1, 1])
    cin = 64
    for stage, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            cout = width * 4 if bottleneck else width
            hint = f"layer{stage + 1}.{i}"
            if bottleneck:
                y = g.relu(g.conv(h, cin, width, 1, hint=f"{hint}.conv1"))
                y = g.relu(g.conv(y, width, width, 3, stride, hint=f"{hint}.conv2"))
                y = g.conv(y, width, cout, 1, gain=0.2, hint=f"{hint}.conv3")
            else:
                y = g.relu(g.conv(h, cin, width, 3, stride, hint=f"{hint}.conv1"))
                y = g.conv(y, width, cout, 3, gain=0.2, hint=f"{hint}.conv2")
            skip = h if stride == 1 and cin == cout else g.conv(h, cin, cout, 1, stride, hint=f"{hint}.down")
            h = g.relu(g.op("Add", [y, skip]))
            cin = cout
    return g.model(g.head(h, cin, classes), (3, size, size), classes)


def mobilenetv2(width: float = 0.5, classes: int = 10) -> onnx.ModelProto:
    g = Net(2)
    div = lambda c: max(8, int(c * width + 4) // 8 * 8)
    cin = div(32)
    h = g.relu6(g.conv("x", 3, cin, 3, 2, hint="stem"))
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)]:
        for i in range(n):
            stride, cout, hidden = (s if i == 0 else 1), div(c), cin * t
            hint = f"block{g.n}"
            y = g.relu6(g.conv(h, cin, hidden, 1, hint=f"{hint}.expand")) if t != 1 else h
            y = g.relu6(g.conv(y, hidden, hidden, 3, stride, group=hidden, hint=f"{hint}.dw"))
            y = g.conv(y, hidden, cout, 1, gain=0.5, hint=f"{hint}.project")
            h = g.op("Add", [h, y]) if stride == 1 and cin == cout else y
            cin = cout
    last = 1280
    h = g.relu6(g.conv(h, cin, last, 1, hint="last"))
    return g.model(g.head(h, last, classes), (3, 96, 96), classes)


def dscnn() -> onnx.ModelProto:
    g = Net(3)
    h = g.relu(g.conv("x", 1, 64, (10, 4), 2, hint="stem"))
    for i in range(4):
        h = g.relu(g.conv(h, 64, 64, 3, group=64, hint=f"ds{i}.dw"))
        h = g.relu(g.conv(h, 64, 64, 1, hint=f"ds{i}.pw"))
    return g.model(g.head(h, 64, 12), (1, 49, 10), 12)


def vit(size: int = 96, patch: int = 16, d: int = 192, heads: int = 3, depth: int = 12) -> onnx.ModelProto:
    g = Net(4)
    tokens = (size // patch) ** 2
    i64 = lambda *v: np.array(v, np.int64)
    h = g.conv("x", 3, d, patch, patch, hint="patch", pads=[0, 0, 0, 0])
    h = g.op("Transpose", [g.op("Reshape", [h, g.init("shape", i64(0, d, -1))])], perm=[0, 2, 1])
    h = g.op("Add", [h, g.init("pos", (g.rng.standard_normal((1, tokens, d)) * 0.02).astype(np.float32))])

    def layernorm(x, hint):
        return g.op("LayerNormalization", [x, g.init(f"{hint}.weight", np.ones(d, np.float32)),
                                           g.init(f"{hint}.bias", np.zeros(d, np.float32))], hint, axis=-1)

    def split_heads(x):
        return g.op("Transpose", [g.op("Reshape", [x, g.init("heads", i64(0, 0, heads, d // heads))])],
                    perm=[0, 2, 1, 3])

    for i in range(depth):
        y = layernorm(h, f"block{i}.ln1")
        q, k, v = (split_heads(g.linear(y, d, d, f"block{i}.{n}", gemm=False)) for n in "qkv")
        scores = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]),
                              g.init("scale", np.array((d // heads) ** -0.5, np.float32))])
        att = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        att = g.op("Reshape", [g.op("Transpose", [att], perm=[0, 2, 1, 3]), g.init("merge", i64(0, 0, d))])
        h = g.op("Add", [h, g.linear(att, d, d, f"block{i}.proj", gemm=False)])
        y = g.op("Gelu", [g.linear(layernorm(h, f"block{i}.ln2"), d, 4 * d, f"block{i}.mlp1", gemm=False)])
        h = g.op("Add", [h, g.linear(y, 4 * d, d, f"block{i}.mlp2", gemm=False)])
    pooled = g.op("ReduceMean", [layernorm(h, "ln"), g.init("axes", i64(1))], keepdims=0)
    return g.model(g.linear(pooled, d, 10, "head", gemm=False), (3, size, size), 10)


BUILDS = {
    "resnet18": lambda: resnet([2, 2, 2, 2], False, 96),
    "mobilenetv2": lambda: mobilenetv2(0.5),
    "dscnn": dscnn,
    "vit": vit,
    "resnet50": lambda: resnet([3, 4, 6, 3], True, 224),
    # real size (benchmarks/real_size.py): ImageNet's 1000 classes, so the classifier is as large as deployed
    "mobilenetv2_1000": lambda: mobilenetv2(1.0, 1000),
    "resnet18_1000": lambda: resnet([2, 2, 2, 2], False, 96, 1000),
    "resnet18_1000_224": lambda: resnet([2, 2, 2, 2], False, 224, 1000),
}


class Calibration(CalibrationDataReader):
    def __init__(self, shape, count: int, batch: int = 8):
        x = np.random.default_rng(0).standard_normal((count, *shape)).astype(np.float32)
        self.batches = iter([{"x": x[i:i + batch]} for i in range(0, count, batch)])

    def get_next(self):
        return next(self.batches, None)


def build(name: str, out: pathlib.Path) -> None:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    model = BUILDS[name]()
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    onnx.save(model, folder / "fp32.onnx")
    for variant, weights in (("w8a8", QuantType.QInt8), ("w16a8", QuantType.QInt16)):
        with tempfile.TemporaryDirectory() as tmp:   # quantize_static writes beside its output
            target = pathlib.Path(tmp) / "q.onnx"
            quantize_static(str(folder / "fp32.onnx"), str(target), Calibration(shape, 8 if name == "resnet50" else 32),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=weights)
            target.replace(folder / f"{variant}.onnx")
    print(f"{name}: {', '.join(f'{p.name} {p.stat().st_size / 2**20:.1f} MB' for p in sorted(folder.glob('*.onnx')))}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=CACHE)
    ap.add_argument("--only", action="append", choices=sorted(BUILDS))
    args = ap.parse_args()
    for name in args.only or BUILDS:
        build(name, args.out)


if __name__ == "__main__":
    main()
