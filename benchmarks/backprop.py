"""The fp32 backprop baseline: fine-tune named tensors of an fp32 ONNX model with torch autograd.

A small interpreter runs the ONNX graph with torch ops, so the baseline trains exactly the model that
was quantized (same weights, same graph) without a hand-written torch copy of each architecture. Only
the ops of the shipped models are covered; any other op raises an error that names it.
torch is a benchmark dependency (pip install -e '.[bench]'), never a package dependency.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _gemm(x, w, b=None, transA=0, transB=0, alpha=1.0, beta=1.0):
    y = alpha * ((x.T if transA else x) @ (w.T if transB else w))
    return y if b is None else y + beta * b


def _conv(x, w, b=None, pads=(0, 0, 0, 0), strides=(1, 1), dilations=(1, 1), group=1, **_):
    if list(pads[:2]) != list(pads[2:]):
        raise NotImplementedError("asymmetric Conv pads")
    return F.conv2d(x, w, b, stride=tuple(strides), padding=tuple(pads[:2]), dilation=tuple(dilations),
                    groups=group)


OPS = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda a, b: a @ b,
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b,
    "Relu": lambda x: torch.relu(x),
    "Clip": lambda x, lo=None, hi=None: torch.clamp(x, lo, hi),
    "Gelu": lambda x, approximate="none": F.gelu(x, approximate=approximate),
    "GlobalAveragePool": lambda x: x.mean(dim=(2, 3), keepdim=True),
    "MaxPool": lambda x, kernel_shape, strides=(1, 1), pads=(0, 0, 0, 0), **_: F.max_pool2d(
        x, tuple(kernel_shape), tuple(strides), tuple(pads[:2])),
    "Flatten": lambda x, axis=1: x.flatten(axis) if axis > 0 else x.reshape(1, -1),
    "Reshape": lambda x, s, allowzero=0: x.reshape([x.shape[i] if (d == 0 and not allowzero) else d
                                                     for i, d in enumerate(s.long().tolist())]),
    "Transpose": lambda x, perm: x.permute(*perm),
    "Softmax": lambda x, axis=-1: torch.softmax(x, axis),
    "Sigmoid": lambda x: torch.sigmoid(x),
    "LayerNormalization": lambda x, w, b, axis=-1, epsilon=1e-5: F.layer_norm(
        x, x.shape[axis:], w, b, epsilon),
    "ReduceMean": lambda x, axes, keepdims=1: x.mean(dim=axes.long().tolist(), keepdim=bool(keepdims)),
}


class OnnxTorch(torch.nn.Module):
    """An fp32 ONNX graph as a torch module; `trained` initializers become Parameters, the rest buffers."""

    def __init__(self, model: onnx.ModelProto, trained: list[str], output: str | None = None):
        """output: the tensor forward returns (default: the graph's first output), e.g. a Sigmoid's logit."""
        super().__init__()
        self.graph = model.graph
        self.output = output or model.graph.output[0].name
        missing = [op for op in {n.op_type for n in model.graph.node} if op not in OPS]
        if missing:
            raise NotImplementedError(f"the backprop baseline has no torch op for {sorted(missing)}")
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        unknown = [t for t in trained if t not in inits]
        if unknown:
            raise KeyError(f"no initializer named {unknown} in the fp32 model")
        self.params = torch.nn.ParameterDict({_key(n): torch.nn.Parameter(torch.tensor(inits[n]))
                                              for n in trained})
        self.consts = {n: torch.tensor(a) for n, a in inits.items() if n not in trained}
        self.trained = trained
        # the nodes that read a trained tensor, directly or through another such node; the others compute
        # the same values at every step (there is nothing random in an inference graph)
        moving, self.live = set(trained), set()       # live: indices into graph.node
        for k, n in enumerate(model.graph.node):
            if any(i in moving for i in n.input):
                self.live.add(k)
                moving.update(n.output)
        self.frontier = sorted({i for k in self.live for i in model.graph.node[k].input
                                if i and i not in moving and i not in inits})

    def tensor(self, name: str) -> np.ndarray:
        return self.params[_key(name)].detach().numpy().copy()

    def frozen(self, x: torch.Tensor) -> dict | None:
        """The values, per example of x, that the trained part of the graph reads from the frozen part,
        or None where one of them does not keep the batch on its first axis (then only forward works)."""
        env = dict(self.consts)
        env[self.graph.input[0].name] = x
        with torch.no_grad():
            for k, node in enumerate(self.graph.node):
                if k in self.live:
                    continue
                env[node.output[0]] = OPS[node.op_type](*[env[i] if i else None for i in node.input], **_attrs(node))
        values = {n: env[n] for n in self.frontier}
        return values if all(v.shape[:1] == x.shape[:1] for v in values.values()) else None

    def forward(self, x: torch.Tensor | None, frozen: dict | None = None) -> torch.Tensor:
        """The graph's output for x; or, with `frozen` (a batch of what frozen() returned), only the
        trained part of the graph (x unused)."""
        env = dict(self.consts)
        env.update({n: self.params[_key(n)] for n in self.trained})
        env[self.graph.input[0].name] = x
        if frozen is not None:
            env.update(frozen)
        for k, node in enumerate(self.graph.node):
            if frozen is not None and k not in self.live:
                continue
            args = [env[i] if i else None for i in node.input]
            env[node.output[0]] = OPS[node.op_type](*args, **_attrs(node))
        return env[self.output]


def _key(name: str) -> str:
    return name.replace(".", "__")


def fine_tune(model: onnx.ModelProto, trained: list[str], x: np.ndarray, y: np.ndarray, epochs: int,
              batch: int, lr: float, seed: int = 0, optimizer: str = "adam", loss: str = "ce") -> OnnxTorch:
    """Fine-tune `trained` on (x, y) with cross-entropy (`loss` ce), or for a Sigmoid output (bce) the
    logistic loss on the logit before the Sigmoid, which the returned net then outputs (fgcompile's bce
    tap); the batches follow the fgcompile Trainer's
    order (permutation of rng([seed, epoch]), remainder dropped), so both methods see the same examples.
    The frozen part of the graph runs once over x (its values do not change), each step only the rest."""
    torch.manual_seed(seed)
    if loss == "bce":
        from fgcompile.heads import head_of
        net = OnnxTorch(model, trained, output=head_of(model).tap)
        y = y.reshape(len(y), -1).astype(np.float32)
        criterion = F.binary_cross_entropy_with_logits
    else:
        net = OnnxTorch(model, trained)
        criterion = F.cross_entropy
    params = list(net.params.values())
    opt = torch.optim.Adam(params, lr) if optimizer == "adam" else torch.optim.SGD(params, lr, momentum=0.9)
    xs, ys = torch.tensor(x), torch.tensor(y)
    per_epoch = len(y) // batch
    frozen = net.frozen(xs)
    logits = (lambda idx: net(None, {k: v[idx] for k, v in frozen.items()})) if frozen is not None \
        else (lambda idx: net(xs[idx]))
    for epoch in range(epochs):
        perm = torch.tensor(np.random.default_rng([seed, epoch]).permutation(len(y)))
        for pos in range(per_epoch):
            idx = perm[pos * batch:(pos + 1) * batch]
            opt.zero_grad()
            criterion(logits(idx), ys[idx]).backward()
            opt.step()
    return net


def accuracy(net: OnnxTorch, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((net(torch.tensor(x)).argmax(-1).numpy() == y).mean())
