"""Split an inference model at the tensors a compiled graph trains: the frozen prefix and the suffix
that the training step runs once per branch. Timing both gives the method's floor,
t(prefix) + 2m · t(suffix): what 2m perturbed forwards cost when the prefix is shared."""
from __future__ import annotations

import onnx
import onnx.utils


def trained_suffix(model: onnx.ModelProto, trained: list[str]) -> set[str]:
    """Names of the nodes that depend on any of the `trained` initializers."""
    reached, nodes = set(trained), set()
    for node in model.graph.node:   # ONNX nodes are topologically sorted
        if any(i in reached for i in node.input):
            nodes.add(node.name)
            reached.update(node.output)
    return nodes


def split(model: onnx.ModelProto, trained: list[str]) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str]]:
    """(prefix model, suffix model, boundary tensor names). The prefix maps the model inputs to the
    boundary; the suffix maps the boundary to the model outputs."""
    model = onnx.shape_inference.infer_shapes(model)
    suffix = trained_suffix(model, trained)
    if not suffix:
        raise ValueError(f"no node reads {trained}")
    # start the suffix at quantized tensors: a DequantizeLinear feeding it moves in, so onnxruntime can
    # fuse the suffix (QGemm, QLinearMatMul) as it fuses the whole model
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in [n for n in model.graph.node if n.name in suffix]:
        for i in node.input:
            p = producer.get(i)
            if p is not None and p.op_type == "DequantizeLinear":
                suffix.add(p.name)
    made_by_prefix = {o for n in model.graph.node if n.name not in suffix for o in n.output}
    made_by_prefix.update(i.name for i in model.graph.input)
    boundary = sorted({i for n in model.graph.node if n.name in suffix for i in n.input if i in made_by_prefix})
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    extractor = onnx.utils.Extractor(model)
    prefix_model = extractor.extract_model(inputs, boundary)
    suffix_model = extractor.extract_model(boundary, outputs)
    return prefix_model, suffix_model, boundary
