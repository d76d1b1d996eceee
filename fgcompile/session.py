"""onnxruntime sessions: the one factory every part of fgcompile creates them with (compiler checks,
runtime, conformance, benchmarks), the facts the runtime reads from one, and its errors while running.

It imports neither the passes nor onnx-graphsurgeon, so the runtime can use it."""
from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np
import onnx
import onnxruntime as ort

from fgcompile.errors import ModelError, SpecError
from fgcompile.spec import check_field_types

OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                "all": "ORT_ENABLE_ALL"}


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))     # what a container or taskset lets this process use
    except AttributeError:                      # macOS, Windows
        return os.cpu_count() or 1


# onnxruntime's intra-op threads spin while they wait, so past one per core they only contend: on 2 cores
# eval took 0.74 s with 2 threads, 0.96 s with 32, 3 min 21 s with 2000. 4 per core leaves room for SMT
# and for experiments; more is refused rather than run slowly.
MAX_THREADS = 4 * _usable_cpus()


# onnxruntime's memory pattern plans one block for all of a run's intermediates from the first run's sizes; a
# training step's graph (batch slices, Loop bodies, branches) peaked 9-25% higher with it and ran no faster
# without it (1000-class MobileNetV2 / ResNet-18, batch 32: benchmarks/README.md, "Training sessions without
# onnxruntime's memory pattern").
# benchmarks/memory.py's training job mirrors it.
TRAINING_MEMORY_PATTERN = False

# A quantized model is scored in its own ONNX arithmetic: DequantizeLinear -> float op -> QuantizeLinear as written,
# which onnxruntime keeps up to its basic level. From the extended level on it fuses them into int8 kernels whose
# u8 x s8 products saturate on CPUs without AVX-VNNI (onnxruntime's quantization docs): on an AVX2 EPYC the
# shipped kws_dscnn scored 51.7% there against 72.4% as the model computes (the reference evaluator's), and a
# model trained in that arithmetic (--forward exact) lost 3.7 points when scored through those kernels.
ARITHMETIC_LEVEL = "basic"


@dataclasses.dataclass(frozen=True)
class SessionSettings:
    """How train and eval run their graphs (`--threads`, `--optimization`, `--provider`). The defaults
    are onnxruntime's own; `disable` runs the ONNX ops as written (the conformance baseline)."""
    threads: int = 0                       # 0: onnxruntime's default
    optimization: str = "all"
    provider: str = "CPUExecutionProvider"

    def __post_init__(self):
        check_field_types(self)
        if self.threads < 0:
            raise SpecError(f"--threads {self.threads}: must be 0 (onnxruntime's default) or more.")
        if self.threads > MAX_THREADS:
            raise SpecError(f"--threads {self.threads}: at most {MAX_THREADS} on this machine (4 per CPU core; more "
                            "threads only contend). Pass 0 to let onnxruntime choose.")
        if self.optimization not in OPTIMIZATION:
            raise SpecError(f"--optimization {self.optimization!r}: choose one of {', '.join(OPTIMIZATION)}.")
        available = ort.get_available_providers()
        if self.provider not in available:
            raise SpecError(f"--provider {self.provider!r}: not available in this onnxruntime build. "
                            f"Available: {', '.join(available)}.")


def make_session(model: onnx.ModelProto | str, threads: int = 0, settings: SessionSettings | None = None,
                 optimized_path: str | None = None, training: bool = False,
                 arithmetic: bool = False) -> ort.InferenceSession:
    """A session of `model` (a ModelProto, or a path) with `settings` (default: onnxruntime's, `threads`
    intra-op threads); optimized_path: where onnxruntime writes the graph it optimized. training: the
    session runs a training step (train.onnx), so it allocates on demand (TRAINING_MEMORY_PATTERN).
    arithmetic: it scores a quantized model as ONNX defines it, so its level stops at ARITHMETIC_LEVEL."""
    settings = settings or SessionSettings(threads=threads)
    level = settings.optimization
    if arithmetic and list(OPTIMIZATION).index(level) > list(OPTIMIZATION).index(ARITHMETIC_LEVEL):
        level = ARITHMETIC_LEVEL
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION[level])
    opts.log_severity_level = 3
    if training:
        opts.enable_mem_pattern = TRAINING_MEMORY_PATTERN
    if settings.threads:
        opts.intra_op_num_threads = settings.threads
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    providers = [settings.provider] + (["CPUExecutionProvider"] if settings.provider != "CPUExecutionProvider" else [])
    return ort.InferenceSession(data, opts, providers=providers)


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
