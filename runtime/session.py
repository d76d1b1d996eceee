"""onnxruntime sessions and the shape facts the runtime needs from a graph."""
from __future__ import annotations

import contextlib

import numpy as np
import onnx
import onnxruntime as ort

from fgcompile.errors import ModelError


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


def input_dtype(sess: ort.InferenceSession, name: str) -> np.dtype:
    """The numpy dtype of input `name` (float32 images, int64 token ids, ...)."""
    kind = next(i.type for i in sess.get_inputs() if i.name == name)   # e.g. "tensor(int64)"
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(
        onnx.TensorProto.DataType.Value(kind[len("tensor("):-1].upper())))


def class_count(sess: ort.InferenceSession) -> int | None:
    shape = sess.get_outputs()[0].shape
    return shape[-1] if shape and isinstance(shape[-1], int) else None


@contextlib.contextmanager
def running(path):
    """Turn an onnxruntime failure while running the graph at PATH (a graph that loads but whose tensors
    disagree, e.g. a scale of the wrong length) into a ModelError; other errors pass."""
    try:
        yield
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        raise ModelError(f"{path}: onnxruntime failed running it ({str(exc).strip().splitlines()[0][:300]}). The model "
                         "is invalid or corrupt; re-export it (or recompile a compiled folder).") from None
