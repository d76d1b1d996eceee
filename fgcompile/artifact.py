"""The compiled artifact, defined once for the compiler and the runtime: the folder's layout, the contract
(the JSON in train.onnx's metadata_props["fgcompile"], and eval.onnx's smaller one), and the in-memory
result of a compile.

OUT/train.onnx   the training graph (its metadata_props hold the spec and the I/O contract)
OUT/eval.onnx    the inference graph with the trained tensors as inputs (for eval during training)
OUT/state.npz    the initial state: one array per trained tensor, named as the graph inputs
OUT/source.onnx  the inference model in canonical QDQ form (passes/canonicalize.py; the input model
                 itself when it already is): export writes the trained weights into a copy
OUT/checkpoint.npz, train_log.jsonl   what `train` writes (runtime/checkpoint.py)
OUT/tune.json    the learning rate `fgcompile tune` chose (runtime/tune.py), when it ran
OUT/.fgcompile-folder, .fgcompile.lock   the marker that fgcompile wrote OUT, and the lock of a run

Contract.from_dict reads what Contract.to_dict writes: from_dict(d).to_json() is the JSON of d for a
contract fgcompile wrote (tests/test_artifact.py). A contract is checked against its graph
(fgcompile/validate.py) before from_dict builds it, so from_dict only supplies defaults for keys that
contracts without them (older compilers, optional parts) leave out.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import onnx

from fgcompile.grid import WIDENING
from fgcompile.spec import TrainSpec

# train/2: the state's `stride` (was `step`) and `lr_numerator` (was `lr`); train/1 folders are recompiled
TRAIN_FORMAT, EVAL_FORMAT = "fgcompile-train/2", "fgcompile-eval/1"
METADATA_KEY = "fgcompile"   # the metadata_props entry that holds the contract


@dataclasses.dataclass(frozen=True)
class Layout:
    """The file names of a compiled folder."""
    train: str = "train.onnx"
    eval: str = "eval.onnx"
    state: str = "state.npz"
    source: str = "source.onnx"
    checkpoint: str = "checkpoint.npz"
    log: str = "train_log.jsonl"
    tune: str = "tune.json"
    marker: str = ".fgcompile-folder"   # JSON: who wrote the folder and from which source model
    lock: str = ".fgcompile.lock"       # flock()ed by the process that trains or replaces the folder

    def names(self) -> set[str]:
        return set(dataclasses.asdict(self).values())


LAYOUT = Layout()


# the JSON keys a contract must hold, with their JSON types (fgcompile/validate.py checks them before
# Contract.from_dict reads them; the keys left out have defaults for contracts of older compilers)
REQUIRED_KEYS = {"spec": dict, "inputs": dict, "outputs": dict, "state": list, "lr_numerator": dict}
REQUIRED_STATE_KEYS = {"name": str, "output": str, "role": str, "dtype": str, "shape": list, "qmin": int, "qmax": int,
                       "stride": int, "source_dtype": str, "widened": bool}


@dataclasses.dataclass(frozen=True)
class StateTensor:
    """One trained tensor: graph input `name`, output `output`, on the integer grid [qmin, qmax].
    stride: grid units per perturbation/update unit (1 for weights; 2**k for int32 biases)."""
    name: str
    output: str
    role: str                  # weight | bias | scale | prompt | momentum (a training buffer, not a parameter)
    site: str
    dtype: str
    shape: list
    axis: int | None
    qmin: int
    qmax: int
    stride: int
    source_dtype: str
    widened: bool
    factor: float              # training LSBs per source LSB (fgcompile/grid.py)
    float_grid: float | None   # a float parameter put on an int32 grid: its scale (passes/floatgrid.py)

    @classmethod
    def from_dict(cls, d: dict) -> "StateTensor":
        return cls(d["name"], d["output"], d["role"], d.get("site", ""), d["dtype"], d["shape"], d.get("axis"),
                   d["qmin"], d["qmax"], d["stride"], d["source_dtype"], d["widened"],
                   d.get("factor", WIDENING if d["widened"] else 1), d.get("float_grid"))


@dataclasses.dataclass(frozen=True)
class Whitening:
    """A preconditioned site: its trained Gemm/MatMul reads input·P (P the initializer `matrix`)."""
    site: str
    weight: str
    input: str
    matrix: str
    layout: str        # kn | nk: the weight's orientation
    ridge: float
    scale: list        # the refit per-channel scale of the whitened weight


@dataclasses.dataclass(frozen=True)
class StepWhitening:
    """A node-perturbation site whose step is preconditioned (passes/node.py): ĝ_W correlates the noise with
    a' ≈ quantize(a·P², scale) (int8, zero point 0) instead of the integer input; the weights stay put. In
    integers: a'_j = clip(⌊(Σ_i (q_i − z)·W_ij + d_j/2) / d_j⌋, −128, 127), W = 256·W_hi + W_lo ≈ P²·(s_in/scale)·d
    (a Conv's W is [C, C], applied to each kernel tap's channels)."""
    site: str
    input: str
    matrix: str        # the initializer W_hi [in, in] (int8)
    scale: float       # the quantization scale of a·P²
    low: str = ""      # the initializer W_lo − 128 [in, in] (int8)
    divisors: str = ""  # the initializer d [in] (int32 powers of two)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The training graph's input names per role (the data input is the first of data_inputs)."""
    data: str
    labels: str = "labels"   # int64 [B]: class indices, or 0/1 ([B, K] for a multi-label Sigmoid head)
    seed: str = "seed"       # int32: the run's seed, two's-complement bits of a value in [0, 2**32)
    step: str = "step"       # int32: the training step k; z derives from (seed, step)
    lr: str = "lr"           # int32: the learning-rate numerator, η = lr / 2**shift


@dataclasses.dataclass(frozen=True)
class Outputs:
    """The training graph's outputs besides the next state: loss and accuracy are means over the 2m
    branches (float32 scalars), loss_plus and loss_minus the Lᵢ⁺ and Lᵢ⁻ (float32 [m])."""
    loss: str = "loss"
    accuracy: str = "accuracy"
    loss_plus: str = "loss_plus"
    loss_minus: str = "loss_minus"


@dataclasses.dataclass(frozen=True)
class LrNumerator:
    """η = numerator / 2**shift; the graph clips its lr input to [0, max]."""
    shift: int
    default: int
    max: int

    def of(self, lr: float) -> int:
        """The numerator of the float rate lr (0 for a rate that is not finite and positive)."""
        return round(lr * (1 << self.shift)) if math.isfinite(lr) and lr > 0 else 0


@dataclasses.dataclass(frozen=True)
class Probes:
    """Internal tensors a conformance check compares across runtimes (`fgcompile verify`)."""
    coefficients: str
    z: list            # one per trained parameter, in the state's order (empty with --branches loop: no
                       # whole z exists; the comparison covers the cᵢ, losses and state)


@dataclasses.dataclass(frozen=True)
class Contract:
    """What train.onnx takes and gives, and how it was compiled."""
    spec: TrainSpec
    inputs: Inputs
    data_inputs: list          # every data input; inputs.data is the first
    outputs: Outputs
    state: list                # [StateTensor]
    lr_numerator: LrNumerator
    model_output: str
    loss_tap: str
    branches: str              # stacked | cloned | loop
    branches_reason: str | None
    tie_tolerance: float
    stream: str
    probes: Probes | None = None
    precondition: list = dataclasses.field(default_factory=list)   # [Whitening]
    head: str = "softmax"      # the output's head (fgcompile/heads.py): softmax | sigmoid
    step_whitening: list = dataclasses.field(default_factory=list)   # [StepWhitening] (--estimator node)
    estimator_reason: str = "given"   # --estimator auto's reason for spec.estimator (passes/plan.py)
    format: str = TRAIN_FORMAT
    version: str = ""

    def to_dict(self) -> dict:
        return {"format": self.format, "version": self.version, "spec": dataclasses.asdict(self.spec),
                "inputs": dataclasses.asdict(self.inputs), "data_inputs": list(self.data_inputs),
                "stream": self.stream, "outputs": dataclasses.asdict(self.outputs),
                "state": [dataclasses.asdict(s) for s in self.state],
                "lr_numerator": dataclasses.asdict(self.lr_numerator),
                "model_output": self.model_output, "loss_tap": self.loss_tap, "branches": self.branches,
                "branches_reason": self.branches_reason, "tie_tolerance": self.tie_tolerance,
                "probes": dataclasses.asdict(self.probes) if self.probes else None,
                "precondition": [dataclasses.asdict(p) for p in self.precondition], "head": self.head,
                "step_whitening": [dataclasses.asdict(p) for p in self.step_whitening],
                "estimator_reason": self.estimator_reason}

    @classmethod
    def from_dict(cls, d: dict) -> "Contract":
        probes = d.get("probes")
        return cls(spec=TrainSpec(**d["spec"]), inputs=Inputs(**d["inputs"]),
                   data_inputs=list(d.get("data_inputs") or [d["inputs"]["data"]]),
                   outputs=Outputs(**d.get("outputs", {})), state=[StateTensor.from_dict(s) for s in d["state"]],
                   lr_numerator=LrNumerator(**d["lr_numerator"]), model_output=d.get("model_output", ""),
                   loss_tap=d.get("loss_tap", ""), branches=d.get("branches", "cloned"),
                   branches_reason=d.get("branches_reason"), tie_tolerance=d.get("tie_tolerance", 0.0),
                   stream=d.get("stream", ""), probes=Probes(**probes) if isinstance(probes, dict) else None,
                   precondition=[Whitening(**p) for p in d.get("precondition") or []], head=d.get("head", "softmax"),
                   step_whitening=[StepWhitening(**p) for p in d.get("step_whitening") or []],
                   estimator_reason=d.get("estimator_reason", "given"), format=d.get("format", TRAIN_FORMAT), version=d.get("version", ""))

    def to_json(self) -> str:
        return _dumps(self.to_dict())

    def weights(self) -> list[StateTensor]:
        return [s for s in self.state if s.role == "weight"]

    def parameters(self) -> list[StateTensor]:
        """The state that is model parameters: all but training buffers (role momentum), which the
        training graph carries but export and eval.onnx do not take."""
        return [s for s in self.state if s.role != "momentum"]


@dataclasses.dataclass(frozen=True)
class EvalContract:
    """eval.onnx: the inference graph whose trained tensors are inputs."""
    data: str
    data_inputs: list
    output: str
    state: list        # the state input names
    format: str = EVAL_FORMAT
    version: str = ""

    def to_json(self) -> str:
        return _dumps(dataclasses.asdict(self))


def _dumps(d: dict) -> str:
    return json.dumps(d, sort_keys=True)


@dataclasses.dataclass
class Compiled:
    """The result of a compile, in memory: what write_compiled puts in the folder."""
    train: onnx.ModelProto
    eval: onnx.ModelProto
    state: dict[str, np.ndarray]
    contract: Contract
    source: onnx.ModelProto   # the canonical inference model: export writes the trained tensors into it
    notes: list[str]          # what canonicalize rewrote
