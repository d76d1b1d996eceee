"""How much of QZO-FF's gap to fp32 backprop is the quantized model itself, on digits_attn.

    python benchmarks/quantized_baseline.py --epochs 30  --variant w16a8
    python benchmarks/quantized_baseline.py --epochs 300 --variant w16a8

The benchmark's baseline trains the classifier (head.weight, head.bias) of the fp32 model. QZO-FF trains
the same tensors of the quantized model, whose classifier reads 8-bit pooled features and whose exported
model keeps 8-bit requantizations after it. Two more baselines, Adam on the same examples in the same
order (3 seeds, lr chosen on the 400/100 validation split, as run.py does):
- fp32 head, deployed: the fp32 baseline's trained head written into the quantized model (weights on a
  refit per-channel int16/int8 scale, the uint8 Add bias on a refit range);
- head on the quantized model: Adam on the quantized model's own (8-bit) pooled features, from the same
  pretrained start; scored in float and deployed as above.
"""
from __future__ import annotations

import pathlib
import sys

import click
import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import accuracy  # noqa: E402
import backprop  # noqa: E402
from fgcompile import models, modelio  # noqa: E402

LRS = [1e-3, 3e-3, 1e-2, 3e-2]
FEATURES = "pool_DequantizeLinear_Output"   # the classifier's input in the quantized digits_attn


def load(split: str):
    d = np.load(models.path(models.manifest()["data"][split]))
    return d["x"], d["y"]


def deployed(source: onnx.ModelProto, w: np.ndarray, b: np.ndarray, test) -> float:
    """Test accuracy of `source` with head.weight = w (K x N) and head.bias = b on refit grids."""
    model = onnx.ModelProto.FromString(source.SerializeToString())
    inits = {i.name: i for i in model.graph.initializer}
    arr = lambda n: numpy_helper.to_array(inits[n])   # noqa: E731
    put = lambda n, v: inits[n].CopyFrom(numpy_helper.from_array(v, n))   # noqa: E731
    info = np.iinfo(arr("head.weight_quantized").dtype)
    s0 = arr("head.weight_scale")
    s = np.maximum(np.abs(w).max(axis=0) / info.max, 1e-12).astype(np.float32)
    s = s.reshape(s0.shape) if s0.size > 1 else np.float32(np.abs(w).max() / info.max)
    put("head.weight_quantized", np.clip(np.round(w / s.reshape(1, -1) if s0.size > 1 else w / s),
                                         info.min, info.max).astype(info.dtype))
    put("head.weight_scale", np.asarray(s, np.float32))
    lo, hi = min(b.min(), 0.0), max(b.max(), 0.0)
    sb = (hi - lo) / 255
    zb = int(round(-lo / sb))
    put("head.bias_quantized", np.clip(np.round(b / sb) + zb, 0, 255).astype(np.uint8))
    put("head.bias_scale", np.array(sb, np.float32))
    put("head.bias_zero_point", np.array(zb, np.uint8))
    return accuracy.untrained(model, test)


def features(source: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    model = onnx.ModelProto.FromString(source.SerializeToString())
    model.graph.output.append(helper.make_tensor_value_info(FEATURES, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {model.graph.input[0].name: x})[1].reshape(len(x), -1)


def fit_head(w0, b0, x, y, epochs: int, lr: float, seed: int, batch: int = 32):
    """Adam on (w, b) of logits = x·w + b, the Trainer's batch order (rng([seed, epoch]))."""
    torch.manual_seed(seed)
    w = torch.tensor(w0, dtype=torch.float32, requires_grad=True)
    b = torch.tensor(b0, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr)
    xs, ys = torch.tensor(x), torch.tensor(y)
    for epoch in range(epochs):
        perm = torch.tensor(np.random.default_rng([seed, epoch]).permutation(len(y)))
        for pos in range(len(y) // batch):
            idx = perm[pos * batch:(pos + 1) * batch]
            opt.zero_grad()
            F.cross_entropy(xs[idx] @ w + b, ys[idx]).backward()
            opt.step()
    return w.detach().numpy().astype(np.float64), b.detach().numpy().astype(np.float64)


@click.command()
@click.option("--epochs", default=30, show_default=True)
@click.option("--variant", type=click.Choice(["w16a8", "w8a8"]), default="w16a8", show_default=True)
def main(epochs, variant):
    train, test = load("target_train"), load("target_test")
    entry = models.manifest()["models"]["digits_attn"]["variants"]
    source = modelio.load_model(models.path(entry[variant]["file"]))
    fp32 = modelio.load_model(models.path(entry["fp32"]["file"]))
    seeds = (0, 1, 2)

    def bp(lr, seed, tr, te, ep, b):
        return backprop.accuracy(backprop.fine_tune(fp32, ["head.weight", "head.bias"], *tr, ep, b, lr, seed), *te)
    lr, _ = accuracy.select(bp, LRS[:3], list(seeds), train, epochs, 32)   # run.py's backprop grid
    nets = [backprop.fine_tune(fp32, ["head.weight", "head.bias"], *train, epochs, 32, lr, s) for s in seeds]
    fp = [backprop.accuracy(n, *test) for n in nets]
    dep = [deployed(source, n.params["head__weight"].detach().numpy().astype(np.float64),
                    n.params["head__bias"].detach().numpy().astype(np.float64), test) for n in nets]
    print(f"fp32 backprop (lr {lr:g}): fp32 {np.mean(fp):.2%}, its head deployed on {variant} {np.mean(dep):.2%}")

    inits = {i.name: numpy_helper.to_array(i) for i in source.graph.initializer}
    sw = inits["head.weight_scale"]
    w0 = inits["head.weight_quantized"].astype(np.float64) * (sw.reshape(1, -1) if sw.size > 1 else sw)
    b0 = (inits["head.bias_quantized"].astype(np.float64) - inits["head.bias_zero_point"].astype(np.float64)) \
        * inits["head.bias_scale"]
    ftr, fte = features(source, train[0]), features(source, test[0])

    def head(lr_, seed, tr, te, ep, b):
        w, bias = fit_head(w0, b0, *tr, ep, lr_, seed, b)
        return float(((te[0] @ w + bias).argmax(-1) == te[1]).mean())
    lr, _ = accuracy.select(head, LRS, list(seeds), (ftr, train[1]), epochs, 32)
    heads = [fit_head(w0, b0, ftr, train[1], epochs, lr, s) for s in seeds]
    fl = [float(((fte @ w + b).argmax(-1) == test[1]).mean()) for w, b in heads]
    dep = [deployed(source, w, b, test) for w, b in heads]
    print(f"head on {variant}'s 8-bit features (lr {lr:g}): float {np.mean(fl):.2%}, deployed {np.mean(dep):.2%} "
          f"(runs {[round(d, 4) for d in dep]})")


if __name__ == "__main__":
    main()
