"""onnxruntime sessions and the shape facts the runtime needs from a graph."""
from __future__ import annotations

import onnx
import onnxruntime as ort


def make_session(model: onnx.ModelProto | str, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def input_shape(sess: ort.InferenceSession, name: str) -> list:
    return next(i.shape for i in sess.get_inputs() if i.name == name)


def class_count(sess: ort.InferenceSession) -> int | None:
    shape = sess.get_outputs()[0].shape
    return shape[-1] if shape and isinstance(shape[-1], int) else None
