"""heads: what a model's output is, read once from the graph for compile, train and eval.

    sigmoid   output = [Q→DQ] Sigmoid([Q→DQ] z), [batch, K]: K independent 0/1 labels per example (a
              detector when K = 1, multi-label otherwise). The loss (bce) reads the logit z, before the
              Sigmoid and before the requantization around it: the probability's 8-bit grid would hide
              the loss change of a ±ε·z step, as the CE tap's logits grid would.
    softmax   any other output [batch, C]: class scores, one class index per example (ce, mse). The loss
              reads it before a trailing Q→DQ, and before a trailing Softmax (TFLite classifiers end in
              one): cross-entropy of the probabilities' own log-softmax would be neither the loss nor its
              gradient. C = 1 is refused: one class cannot be wrong.

The walk is written once over a `producer` view of the graph, so the compiler's onnx-graphsurgeon graph
and the runtime's ModelProto (a plain model file, which has no contract) read the head the same way.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import onnx

from fgcompile.errors import ModelError

HEADS = ("softmax", "sigmoid")
# what a producer view answers for a tensor name: (op, input names, readers of the tensor), or None for a
# graph input or initializer
Producer = Callable[[str], "tuple[str, list[str], int] | None"]


@dataclasses.dataclass(frozen=True)
class Head:
    kind: Literal["softmax", "sigmoid"]
    tap: str             # the tensor the loss reads
    probabilities: bool = False   # the output is a Softmax's: eval's cross-entropy reads its log


def read_head(output: str, producer: Producer) -> Head:
    """The head of the graph whose first output is `output`."""
    scores = _before_requant(output, producer)
    node = producer(scores)
    if node is not None and node[0] == "Sigmoid":
        return Head("sigmoid", _before_requant(node[1][0], producer))
    if node is not None and node[0] == "Softmax":
        return Head("softmax", _before_requant(node[1][0], producer), probabilities=True)
    return Head("softmax", scores)


def _before_requant(name: str, producer: Producer) -> str:
    """a when `name` is DQ(Q(a)) and nothing else reads the Q's output; else `name`."""
    dq = producer(name)
    if dq is None or dq[0] != "DequantizeLinear":
        return name
    q = producer(dq[1][0])
    if q is None or q[0] != "QuantizeLinear" or q[2] != 1:
        return name
    return q[1][0]


def head_of(model: onnx.ModelProto) -> Head:
    """The head of a model file (the runtime's view: no onnx-graphsurgeon)."""
    made = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1

    def producer(name):
        n = made.get(name)
        return None if n is None else (n.op_type, list(n.input), readers.get(name, 0))
    return read_head(model.graph.output[0].name, producer)


def check_classes(kind: str, classes: int | None, output: str = "") -> None:
    """ModelError for a softmax/identity output with one class (a detector needs a Sigmoid output), or a
    Sigmoid output whose label axis is not fixed (the labels' shape, [n] or [n, K], depends on it)."""
    where = f" ({output!r}, [batch, {classes or '?'}])" if output else f" ([batch, {classes or '?'}])"
    if kind == "sigmoid" and classes is None:
        raise ModelError(f"the Sigmoid output{where} has no fixed number of labels, so the labels' shape ([n] for "
                         "one, [n, K] for K) is unknown. Re-export the model with a fixed last axis.")
    if kind == "softmax" and classes == 1:
        raise ModelError(f"the output has one class{where}; a detector needs a Sigmoid output (use --loss bce) or "
                         "two classes. Re-export the model with a Sigmoid on its output, or with one score per "
                         "class (e.g. [background, keyword]).")
