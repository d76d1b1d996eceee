"""The record that passes share, grouped by the pass that fills each part, and the Pass declaration.

A pass is `run(graph, ctx) -> graph` with the Context fields it reads and the ones it adds; the
pipeline (passes/pipeline.py) checks both around every pass. Each group below is None until its pass
sets it whole, so "did the pass keep its promise" is one `is not None`. Nothing here edits a graph.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fgcompile.artifact import Contract, StateTensor, StepWhitening, Whitening
from fgcompile.spec import TrainSpec


@dataclasses.dataclass(frozen=True)
class Pass:
    name: str
    run: Callable           # (graph, ctx) -> graph: an onnx.ModelProto before `load`, a gs.Graph after
    reads: tuple[str, ...] = ()   # Context fields that must be set before it runs
    adds: tuple[str, ...] = ()    # Context fields it sets (checked after it runs)


@dataclasses.dataclass
class Parameter:
    """One quantized initializer as the training graph sees it."""
    name: str            # initializer name (the state input keeps it)
    dq_node: str         # the DequantizeLinear that reads it
    dtype: str
    shape: tuple[int, ...]
    axis: int | None     # per-channel axis, None when per-tensor
    scale_name: str
    zero_point_name: str | None
    float_grid: float | None = None  # for a float parameter put on an int32 grid: its scale (floatgrid)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclasses.dataclass
class WeightSite:
    """A node whose parameters can train (analyze finds them)."""
    name: str            # the consumer node's name
    op: str              # Conv | Gemm | MatMul | LayerNormalization | BatchNormalization
    weight: Parameter    # a product's weight, or a normalization's scale
    bias: Parameter | None
    kind: Literal["product", "norm", "prompt"] = "product"

    @property
    def params(self) -> int:
        return self.weight.numel + (self.bias.numel if self.bias else 0)


@dataclasses.dataclass
class Trainable:
    """One tensor that becomes training state. Values stay on the integer grid [qmin, qmax].

    stride: grid units per perturbation/update unit (1 for weights; 2**k for int32 biases, so that one
    bias stride moves the output about as much as one weight LSB on a unit input)."""
    tensor: Parameter
    role: Literal["weight", "bias", "scale", "prompt"]   # scale: a normalization's scale
    site: str
    qmin: int
    qmax: int
    stride: int = 1
    source_dtype: str = ""
    widened: bool = False
    factor: float = 1    # training LSBs per source LSB (fgcompile/grid.py)
    op: str = ""         # the site's op (a Conv weight's branches are built one kernel at a time)

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def output_name(self) -> str:
        return f"{self.tensor.name}__next"

    @property
    def shape(self) -> list[int]:
        return list(self.tensor.shape)

    def contract(self) -> StateTensor:
        return StateTensor(self.name, self.output_name, self.role, self.site, self.tensor.dtype, self.shape,
                           self.tensor.axis, self.qmin, self.qmax, self.stride, self.source_dtype, self.widened,
                           self.factor, self.tensor.float_grid)


@dataclasses.dataclass
class ModelIO:          # analyze
    data_inputs: list[str]   # every data input, in graph order (train/eval read one .npz array each)
    output: str
    loss_tap: str            # what the loss reads: the output, or its float input before a trailing Q/DQ
                             # (a Sigmoid head's: the logit before the Sigmoid; fgcompile/heads.py)
    sites: list[WeightSite]
    head: str = "softmax"    # softmax | sigmoid (fgcompile/heads.py)
    classes: int | None = None   # the output's last axis (a Sigmoid head's labels per example), when fixed

    @property
    def data_input(self) -> str:
        """The first data input (the contract's inputs.data)."""
        return self.data_inputs[0]


@dataclasses.dataclass(frozen=True)
class Plan:             # plan: how the step is estimated, decided once
    estimator: str                      # sign | spsa | node (--estimator auto resolved)
    reason: str                         # why: "given", or auto's reason
    m: int
    exact: str | None = None            # the site stepped by its exact gradient: head's, or node's output layer
    weighed: bool = False               # node: the perturbed layers' signs weighed by the clean one logit's |V|


@dataclasses.dataclass
class State:            # lift
    inputs: dict[str, gs.Variable]      # trainable name -> its graph input
    initial: dict[str, np.ndarray]      # trainable name -> initial value (state.npz)


@dataclasses.dataclass
class Perturbations:    # prng
    seed: gs.Variable
    step: gs.Variable                   # the training step (int32 input)
    z: dict[str, gs.Tensor]             # int8 [m, *shape]
    round_noise: dict[str, gs.Tensor]   # int32 [*shape] (stochastic rounding only)
    sparse_noise: dict[str, gs.Tensor] = dataclasses.field(default_factory=dict)  # int32 [*shape] (sparsify)
    momentum_noise: dict[str, gs.Tensor] = dataclasses.field(default_factory=dict)  # int32 [m, *shape], 8 bits
    ascent: dict[str, gs.Tensor] = dataclasses.field(default_factory=dict)  # int32 [*shape]: pair centres W±εz
                                                                           # at W + ascent (momentum, --sharpness)
    # z_at(b, i) -> {name: zᵢ int8 [*shape]} for an int32 [1] pair index i known at run time, built with
    # Builder b (the memory-bounded form's Loop bodies): row i of z, the same values (|z| <= 4) in one byte
    # each; momentum wraps it too
    z_at: Callable | None = None
    momentum_at: Callable | None = None     # row i of momentum_noise, the same way
    # z_words(b, name, first, count) -> int8 [m, count·elements per word] of one trainable: its words first .. first +
    # count − 1 (first an int32 [1] tensor known at run time) of every zᵢ, for a piece of the tensor
    z_words: Callable | None = None
    # per_example(b, t, count) -> int8 [m, count]: the node estimator's ±1 noise of trainable t's stream
    per_example: Callable | None = None


@dataclasses.dataclass
class Branches:         # pair
    w32: dict[str, gs.Tensor]           # int32 view of each state input (update reuses it)
    logits: gs.Tensor                   # float [2m, B, C]: branches +0..+(m-1), -0..-(m-1)
    logits_branch_axis: int             # 0, or 1 when `logits` is [B, 2m, C] (the wide product's layout)
    form: Literal["stacked", "cloned", "loop", "none"]   # none: --estimator head's one forward
    reason: str | None                  # why not stacked (the op and why), else None
    clean_logits: gs.Tensor | None = None   # node, where plan.weighed: the clean logits whose |V| weighs the signs


@dataclasses.dataclass
class NodeLayer:        # node: one trained Gemm/MatMul/Conv as the node estimator reads it back
    site: str
    weight: "Trainable | None"
    bias: "Trainable | None"
    noise: gs.Tensor                    # int8 [m, B, *out]: uᵢ,b (the + branches add it, the − branches subtract)
    q: gs.Tensor                        # the clean integer input [B, ..., in] (uint8 or int8)
    zero_point: gs.Constant             # its zero point (a = q − zp)
    scale: gs.Constant                  # its scale
    whitening: "tuple | None"   # (StepWhitening, W_hi, W_lo − 128, d) constants: a' replaces q − zp
    layout: Literal["kn", "nk"]         # the weight's [in, out] (MatMul, Gemm) or [out, in] (Gemm transB, Conv)
    centered: bool = False              # its output is the logits of the ce loss: V_b loses its mean over outputs
    patches: "Patches | None" = None    # a Conv: its im2col geometry (ĝ_W is a Gemm's on the patch rows)
    image: tuple[int, int, int] | None = None   # a Conv: its input's [C, H, W]
    groups: int = 1                     # a grouped Conv's groups: ĝ_W is one product per group
    logits: gs.Tensor | None = None     # the output layer at depth: the clean logits its exact step reads (no noise)


@dataclasses.dataclass
class Losses:           # loss
    labels: gs.Variable
    plus: gs.Tensor                     # float [m]
    minus: gs.Tensor                    # float [m]
    metrics: list[gs.Tensor]            # loss, accuracy (float scalars)
    per_example: gs.Tensor | None = None   # float [2m, B]: each example's loss per branch (--estimator node)
    difference: gs.Tensor | None = None    # int32 [m]: Σ_b L⁺ − L⁻ exact in sign (integer_loss; else None)
    signs: gs.Tensor | None = None         # int32 [m, B]: each example's sign(L⁺ − L⁻) (node; integer_loss)


@dataclasses.dataclass
class GradRows:         # estimate, loop form: ĝ of a tensor a chunk of rows at a time, never whole
    rows: int                           # rows of the leading axis per chunk (formulas.chunk_rows)
    at: Callable                        # at(b, k) -> int32 ĝ [rows, *shape[1:]] of chunk k (an int64 scalar)


@dataclasses.dataclass
class Estimate:         # estimate
    coefficients: gs.Tensor             # int32 [m]: the cᵢ, the only values that cross from float
    grad: dict[str, gs.Tensor]          # ĝ [*shape]: int32, or int8/int16 in the loop form
    rows: dict[str, GradRows] = dataclasses.field(default_factory=dict)   # the loop form's tensors not in grad


@dataclasses.dataclass
class Buffers:          # momentum: training state that is not a model parameter
    inputs: dict[str, gs.Variable]      # trainable name -> `<name>__momentum`
    outputs: dict[str, gs.Tensor]       # trainable name -> `<name>__momentum__next` (filled after estimate)
    entries: list[StateTensor]          # their contract state entries (role "momentum")


@dataclasses.dataclass
class Update:           # update
    lr_numerator: gs.Variable           # the `lr` input: int32 numerator of η = lr_numerator / 2^lr_shift
    lr_max: int
    state_out: dict[str, gs.Variable]   # trainable name -> `<name>__next`


@dataclasses.dataclass
class Context:
    spec: TrainSpec                     # estimator/m filled in by plan, eps/lr by the pipeline's `resolve`
    source: onnx.ModelProto             # the input, then its canonical form (export writes into it)
    calibration: np.ndarray | None = None   # float32 inputs [N, ...] for precondition
    notes: list[str] | None = None      # canonicalize, prompts: what they rewrote
    io: ModelIO | None = None
    trainables: list[Trainable] | None = None   # select; floatgrid, widen and precondition refine them
    plan: Plan | None = None
    preconditioned: list[Whitening] | None = None   # precondition: contract entries, one per whitened site
    # precondition, --estimator node: (contract entry, its P² constant) per whitened site
    step_whitening: list[tuple] | None = None   # (StepWhitening, W_hi, W_lo − 128, d) constants
    state: State | None = None
    eval_model: onnx.ModelProto | None = None
    perturbations: Perturbations | None = None
    branches: Branches | None = None
    losses: Losses | None = None
    estimate: Estimate | None = None
    update: Update | None = None
    node: list[NodeLayer] | None = None   # node: the trained layers' noise and clean inputs (--estimator node)
    buffers: Buffers | None = None      # momentum (empty without --momentum and --sharpness)
    contract: Contract | None = None
    train_model: onnx.ModelProto | None = None
