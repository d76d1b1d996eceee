"""The record that passes share: what was found, what trains, and the tensors each pass adds.

Passes read and extend it; only the pipeline creates it. Nothing here edits a graph.
"""
from __future__ import annotations

import dataclasses

import onnx_graphsurgeon as gs

from fgcompile.spec import TrainSpec
from .analyze import Tensor, WeightSite


@dataclasses.dataclass
class Trainable:
    """One tensor that becomes training state. Values stay on the integer grid [qmin, qmax].

    step: grid units per perturbation/update unit (1 for weights; 2**k for int32 biases, so that one
    bias step moves the output about as much as one weight LSB on a unit input)."""
    tensor: Tensor
    role: str            # "weight" | "bias" | "scale" (a normalization's scale)
    site: str
    qmin: int
    qmax: int
    step: int = 1
    source_dtype: str = ""
    widened: bool = False
    factor: float = 1    # training LSBs per source LSB (fgcompile/grid.py)

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def output_name(self) -> str:
        return f"{self.tensor.name}__next"

    def contract(self) -> dict:
        return {"name": self.name, "output": self.output_name, "role": self.role, "site": self.site,
                "dtype": self.tensor.dtype, "shape": list(self.tensor.shape), "axis": self.tensor.axis,
                "qmin": self.qmin, "qmax": self.qmax, "step": self.step,
                "source_dtype": self.source_dtype, "widened": self.widened, "factor": self.factor,
                "float_grid": self.tensor.float_grid}


@dataclasses.dataclass
class Context:
    spec: TrainSpec
    data_input: str = ""    # the first data input (the contract's inputs.data)
    data_inputs: list[str] = dataclasses.field(default_factory=list)  # all of them, in graph order
    output: str = ""
    loss_tap: str = ""  # what the loss reads: the output, or its float input before a trailing Q/DQ
    sites: list[WeightSite] = dataclasses.field(default_factory=list)
    trainables: list[Trainable] = dataclasses.field(default_factory=list)
    # tensors added by passes, keyed by trainable name where per tensor
    state_in: dict[str, gs.Variable] = dataclasses.field(default_factory=dict)
    state_out: dict[str, gs.Variable] = dataclasses.field(default_factory=dict)
    seed: gs.Variable | None = None
    step: gs.Variable | None = None
    lr: gs.Variable | None = None
    labels: gs.Variable | None = None
    z: dict[str, gs.Tensor] = dataclasses.field(default_factory=dict)          # int32 [m, *shape]
    round_noise: dict[str, gs.Tensor] = dataclasses.field(default_factory=dict)  # int32 [*shape]
    w32: dict[str, gs.Tensor] = dataclasses.field(default_factory=dict)        # int32 view of state_in
    branch_logits: gs.Tensor | None = None  # float [2m, B, C]: branches +0..+(m-1), -0..-(m-1)
    branches: str = ""                      # stacked (one suffix for all branches) | cloned | loop
    branches_reason: str | None = None      # why the branches were cloned (the op that has no rule)
    loss_plus: gs.Tensor | None = None
    loss_minus: gs.Tensor | None = None
    extra_outputs: list[gs.Tensor] = dataclasses.field(default_factory=list)  # loss, accuracy
    grad: dict[str, gs.Tensor] = dataclasses.field(default_factory=dict)       # int32 ĝ [*shape]
    coefficients: gs.Tensor | None = None   # int32 [m]: the cᵢ, the only values that cross from float
    lr_max: int = 0
    calibration: object = None   # float32 inputs [N, ...] for precondition (None: no preconditioning)
    preconditioned: list[dict] = dataclasses.field(default_factory=list)  # contract entries, one per site
