"""TrainSpec: every option of a compilation, validated in one place and recorded in the graph.

The spec is what `fgcompile compile` flags set. It is written (as JSON) into the training graph's
metadata_props so that `train`, `eval` and `export` need nothing but the compiled output.
"""
from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing

from fgcompile.errors import SpecError, wrong_type

PERTURBATIONS = ("rademacher", "ternary", "gaussian")
LOSSES = ("auto", "ce", "mse", "bce")   # auto: bce for a Sigmoid output, else ce (TrainSpec.for_head)
ESTIMATORS = ("auto", "sign", "spsa", "node", "head")   # node: per-example activity perturbation (passes/node.py);
# head: the exact gradient of the output layer's loss at its logits (passes/head.py);
# auto: node when it trains deeper than one layer and takes every site, head for a lone output layer of a ce
# loss, else sign (passes/plan.py)
# m when unset, per estimator: stacked branches make weight perturbation's m cheap, and m = 32 gained 4-9
# points over m = 8 there (m = 64 with the cosine schedule another 2 on the transformer at 30 epochs);
# node perturbation samples every example, and m = 8 trained fc1+fc2 as far (benchmarks/README.md)
DEFAULT_M = {"sign": 64, "spsa": 64, "node": 8, "head": 1}   # head draws nothing: m = 1 names its one forward
# the estimators whose step reads the trained layers' own inputs: not replayable from the coefficients, no z
READS_ACTIVATIONS = ("node", "head")
ROUNDINGS = ("nearest", "stochastic")
BRANCH_FORMS = ("auto", "stacked", "cloned", "loop")
PRECONDITIONS = ("auto", "whiten", "none")
SPARSE_MODES = ("topk", "random", "threshold")
FORWARDS = ("qdq", "exact")   # exact: frozen quantized ops in integer arithmetic every runtime agrees on (passes/exact_forward.py)
NODE_SCHEDULES = ("auto", "all", "alternate")   # node: which trained layers direction i perturbs (passes/node.py;
# auto: passes/plan.py)
HEADROOMS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# --headroom when unset (passes/plan.py): 4, or 128 where head or node trains a one-logit detector, at any depth
# (the exact step of its output layer needed weights ~90x the pretrained range: alone, at 4 it stalled at
# AUC 0.971, miss rate 20%; at 128 0.986, 3.9%, against Sign-m-SPSA's 0.985, 5.7%; node at --last 2: 0.980 /
# 12.5% at 4, 0.988 / ~6% at 32 and 128; node at block2.pw alone: 0.985 / 8.1% at 4, 0.988 / 4.7% at 32 and
# 128; benchmarks/README.md, "The detector"); at 128 the classifiers' heads lost 0.3-0.4 points
DEFAULT_HEADROOM = 4
DETECTOR_HEADROOM = 128
BITS = (8, 16)   # 16: an 8-bit weight trains widened to 16 bits; 8: it keeps its grid
# (eps, lr) in LSBs of the training grid when unset. On a 16-bit grid one int8 LSB is 256 LSBs: eps 64 and
# lr 128 are a quarter and a half of an int8 step (measured on the shipped digits task). A grid with
# headroom H has 16 − log2(H) bits of resolution per int8 step; its defaults are the same fractions.
# With headroom 4 (14 bits) the measured best rate was lower than that: 8-32 chosen on validation at m = 32.
GRID_DEFAULTS = {16: (64, 128.0), 14: (16, 16.0), 8: (1, 1.0)}
# The rates `fgcompile tune` and the benchmark search, by the same resolution: around the default. The
# 14-bit and int8 grids reach 4x lower than they did, because 300-epoch runs chose their smallest rate (4
# and 0.25); with the lower rates they chose 1-2 and 0.0625 (benchmarks/results/accuracy-300ep.md).
LR_GRIDS = {16: (32.0, 64.0, 128.0, 256.0, 512.0), 14: (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0), 8: (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0)}


# The node estimator's ĝ sums a clean integer input (|a| <= 255) over every example and direction, so its
# rate is this much smaller than weight perturbation's for the same weight steps; ε is in output LSBs.
NODE_LR_DIVISOR = 256
NODE_EPS = 1


def lr_grid(grid_bits: int, estimator: str = "sign") -> tuple[float, ...]:
    """The learning rates worth trying on a training grid of `grid_bits` bits (others: the default ×¼…×4);
    for the node estimator its default ×¼…×16, ×32 and ×128 (no lower than the fixed point's 2^-8), for head
    ten doublings from ×1/16 or from 2^-8, whichever is higher (tune adds twice the top under the cosine
    schedule and drops what the graph's int32 bound cannot take)."""
    if estimator in READS_ACTIVATIONS:
        lr = TrainSpec(estimator=estimator).resolve(grid_bits).lr
        # node: 2^2..2^4 at depth and at a lone Gemm, 2^7..2^8 at a lone Conv (its ĝ is a mean over output
        # positions); ×⅛ never won
        if estimator == "node":
            return tuple(lr * 2.0 ** k for k in [*range(-2, 5), 5, 7] if lr * 2.0 ** k >= 2.0 ** -8)
        # head: ×1/16…×32 on the 14-bit grid (digits' classifier chose ×64: cosine's doubling of ×32); on the
        # detector's 9-bit grid (headroom 128) the default is the fixed point's floor, and the best rate ×64 of it
        low = max(lr / 16, 2.0 ** -8)
        return tuple(low * 2.0 ** k for k in range(10))
    if grid_bits in LR_GRIDS:
        return LR_GRIDS[grid_bits]
    lr = TrainSpec().resolve(grid_bits).lr
    return tuple(lr * 2.0 ** k for k in range(-2, 3))


SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class RunDefaults:
    """Defaults of a training run (`train`, `tune`, Trainer.fit): the graph does not fix them, so each run
    may choose its own."""
    epochs: int = 10
    batch: int = 32
    checkpoint_every: int = 50
    # cosine with m = 64 and a rate chosen by 5-fold cross-validation met #15's targets on both shipped
    # models (benchmarks/results/accuracy-defaults.md); constant at m = 32 was 2.8 points short at 30 epochs
    schedule: str = "cosine"
    seeds: int = 1          # tune: training runs per rate (per fold)
    holdout: float = 0.2    # tune: the share of the data held out to validate, when given instead of folds
    folds: int = 5          # tune: K-fold cross-validation; every example validates once
    # adapt: the whole job, so a budget that converges on the shipped tasks (10 left digits_cnn ~3 points
    # short of 30, benchmarks/results/accuracy-defaults.md)
    adapt_epochs: int = 30


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Options of one compilation. Units: eps in weight LSBs; lr in LSBs per unit of ĝ.

    train: regexes on weight names (initializer or site name); empty means use `last`.
    last: train the N weight sites nearest the output (default 1), each with its bias.
    freeze: regexes on site, weight or bias names; a matching site never trains (`last` counts the sites
        left, and freeze wins over train).
    lr: learning rate η, stored as the integer numerator round(lr * 2**lr_shift).
    density: share of nonzero ternary entries, applied in steps of 1/128 (rounded, at least 1/128).
    """

    train: tuple[str, ...] = ()
    last: int = 1
    freeze: tuple[str, ...] = ()
    include_bias: bool = True
    m: int | None = None     # None: DEFAULT_M of the estimator (passes/plan.py)
    eps: int | None = None   # None: resolved by the training grid (see GRID_DEFAULTS)
    lr: float | None = None
    lr_shift: int = 8
    perturbation: str = "rademacher"
    density: float = 1.0
    loss: str = "auto"
    estimator: str = "auto"
    node_schedule: str = "auto"   # node: all trained layers per direction, or alternate: layer i mod L (auto: plan)
    spsa_gain: float = 64.0
    rounding: str = "nearest"
    bits: int = 16  # 16: widen int8 trainable weights to int16 for training; 8: keep int8
    seed: int = 0
    requant_bypass: bool = True   # the branches read the activation Q→DQ pairs after the suffix's last
                                  # Conv/MatMul/Gemm as float (see passes/pair.py)
    branches: str = "auto"        # auto: stacked for a small suffix, else cloned (passes/pair.py _form); node: loop
    memory_budget_mb: float | None = None   # auto picks the loop when stacked weights would exceed it
    prompts: int = 0              # trainable tokens appended at a transformer block's input (passes/prompts.py)
    prompt_at: str = ""           # that block's LayerNormalization (default: the first over [B, T, D])
    headroom: int | None = None   # the training grid spans H x the pretrained range (fgcompile/grid.py);
                                  # None: DEFAULT_HEADROOM or DETECTOR_HEADROOM (passes/plan.py)
    precondition: str = "auto"    # whiten the trained layer's input (auto: when calibration data is given)
    kernel_norm: bool = False     # each kernel's ĝ scaled to its weight's norm (passes/kernelnorm.py)
    sparsity: float = 0.0         # share of each tensor's elements a step leaves unchanged (passes/sparsify.py)
    sparse_mode: str = "topk"     # which elements move: topk (largest |ĝ|), random (hashed), threshold (|ĝ| >= sparsity·max|ĝ|)
    momentum: float = 0.0         # momentum-guided sampling: share of z drawn as sign(momentum) (passes/momentum.py)
    sharpness: int = 0            # sharpness-aware: the ±εz pair is centred ρ LSBs up the momentum's slope
    forward: str = "exact"        # qdq: the source's QDQ ops, fused and rounded as each runtime does (faster on onnxruntime)

    def __post_init__(self):
        check_field_types(self)
        object.__setattr__(self, "train", tuple(self.train))
        object.__setattr__(self, "freeze", tuple(self.freeze))
        self.validate()

    @classmethod
    def of(cls, spec, where: str) -> "TrainSpec":
        """SPEC as a TrainSpec: None (the defaults), a TrainSpec, or a dict of its fields (unknown ones refused)."""
        if spec is None or isinstance(spec, cls):
            return spec or cls()
        if not isinstance(spec, dict):
            raise wrong_type(where, "a TrainSpec or a dict of its fields", spec)
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in spec if k not in fields]
        if unknown:
            raise SpecError(f"{where}: no option {unknown[0]!r}. TrainSpec's fields: {', '.join(fields)}.")
        return cls(**spec)

    def resolve(self, grid_bits: int) -> "TrainSpec":
        """Fill eps/lr left unset with the defaults for a grid of `grid_bits` bits of resolution (source
        bits + log2 of the widening factor: 16 for int8 x 256, 14 with headroom 4, 8 on the int8 grid)."""
        if grid_bits in GRID_DEFAULTS:
            eps, lr = GRID_DEFAULTS[grid_bits]
        elif 8 < grid_bits < 16:
            eps, lr = (max(1, GRID_DEFAULTS[16][0] >> (16 - grid_bits)), GRID_DEFAULTS[16][1] / 2 ** (16 - grid_bits))
        else:
            eps, lr = GRID_DEFAULTS[16 if grid_bits >= 16 else 8]
        if self.estimator in READS_ACTIVATIONS:
            eps, lr = NODE_EPS, max(lr / NODE_LR_DIVISOR, 2.0 ** -self.lr_shift)   # head: the same default (digits_cnn's best, 1-4 on its 14-bit grid)
        return dataclasses.replace(self, eps=self.eps if self.eps is not None else eps,
                                   lr=self.lr if self.lr is not None else lr)

    def for_head(self, head: str) -> "TrainSpec":
        """The loss of a model whose output head (fgcompile/heads.py) is `head`: auto resolves to bce for a
        Sigmoid output, ce otherwise; a loss that cannot train the head is refused."""
        if self.loss == "auto":
            return dataclasses.replace(self, loss="bce" if head == "sigmoid" else "ce")
        if self.loss == "bce" and head != "sigmoid":
            raise SpecError("--loss bce: the model's output is not a Sigmoid; bce trains 0/1 labels on the logit "
                            "before a Sigmoid output [batch, K]. Use --loss ce (or auto) for class scores.")
        if self.loss != "bce" and head == "sigmoid":
            raise SpecError(f"--loss {self.loss}: the model's output is a Sigmoid (a detector or multi-label head); "
                            f"{self.loss} reads class scores and would learn nothing from it. Use --loss bce (or "
                            "auto).")
        return self

    @property
    def lr_numerator(self) -> int:
        return int(round(self.lr * (1 << self.lr_shift)))

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise SpecError(msg)

        need(self.m is None or 1 <= self.m <= 64, f"--m {self.m}: the number of perturbations must be 1..64.")
        need(0 <= self.prompts <= 1024, f"--prompts {self.prompts}: the number of prompt tokens must be 0..1024.")
        need(self.last >= 1, f"--last {self.last}: train at least one weight site (use --last 1 or more).")
        for flag, pattern in [("--train", p) for p in self.train] + [("--freeze", p) for p in self.freeze]:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise SpecError(f"{flag} {pattern!r}: not a valid regular expression ({exc}). Escape special "
                                f"characters, e.g. {flag} 'fc2\\.weight'.") from None
        need(self.headroom is None or self.headroom in HEADROOMS,
             f"--headroom {self.headroom}: choose a power of two 1..256, or auto.")
        need(self.precondition in PRECONDITIONS,
             f"--precondition {self.precondition!r}: choose one of {', '.join(PRECONDITIONS)}.")
        need(math.isfinite(self.sparsity) and 0.0 <= self.sparsity < 1.0,
             f"--sparsity {self.sparsity}: the share of elements left unchanged per step must be in [0, 1), e.g. 0.9.")
        need(math.isfinite(self.momentum) and 0.0 <= self.momentum < 1.0,
             f"--momentum {self.momentum}: the share of z drawn from the momentum must be in [0, 1), e.g. 0.25.")
        need(0 <= self.sharpness <= 4096, f"--sharpness {self.sharpness}: ρ is in weight LSBs and must be 0..4096.")
        need(self.sparse_mode in SPARSE_MODES,
             f"--sparse-mode {self.sparse_mode!r}: choose one of {', '.join(SPARSE_MODES)}.")
        need(self.forward in FORWARDS, f"--forward {self.forward!r}: choose one of {', '.join(FORWARDS)}.")
        need(self.node_schedule in NODE_SCHEDULES,
             f"--node-schedule {self.node_schedule!r}: choose one of {', '.join(NODE_SCHEDULES)}.")
        need(self.node_schedule != "alternate" or self.estimator in ("node", "auto"),
             f"--node-schedule {self.node_schedule} applies to --estimator node only (weight perturbation perturbs "
             "every trained tensor in every direction). Add --estimator node, or drop --node-schedule.")
        if self.estimator in READS_ACTIVATIONS:
            self._validate_node()
        need(self.estimator != "head" or self.m in (None, 1),
             f"--m {self.m}: --estimator head draws no perturbation (one clean forward a step). Drop --m.")
        if self.eps is None or self.lr is None:
            return  # checked again once resolve() fills them
        need(1 <= self.eps <= 4096, f"--eps {self.eps}: ε is in weight LSBs and must be 1..4096.")
        need(0 <= self.lr_shift <= 16, f"lr_shift {self.lr_shift}: must be 0..16.")
        need(math.isfinite(self.lr) and self.lr > 0,
             f"--lr {self.lr}: the learning rate must be a positive number of LSBs per step.")
        need(self.lr_numerator >= 1,
             f"--lr {self.lr}: smaller than the fixed-point resolution 2**-{self.lr_shift}; raise --lr.")
        need(self.lr_numerator < 2 ** 20,
             f"--lr {self.lr}: too large for the int32 update (lr * 2**{self.lr_shift} must be < 2**20).")
        need(self.perturbation in PERTURBATIONS,
             f"--perturbation {self.perturbation!r}: choose one of {', '.join(PERTURBATIONS)}.")
        need(0.0 < self.density <= 1.0, f"--density {self.density}: must be in (0, 1].")
        need(self.density == 1.0 or self.perturbation == "ternary",
             f"--density {self.density} applies to --perturbation ternary only.")
        need(self.loss in LOSSES, f"--loss {self.loss!r}: choose one of {', '.join(LOSSES)}.")
        need(self.estimator in ESTIMATORS, f"--estimator {self.estimator!r}: choose {' or '.join(ESTIMATORS)}.")
        need(self.rounding in ROUNDINGS, f"--rounding {self.rounding!r}: choose {' or '.join(ROUNDINGS)}.")
        need(self.branches in BRANCH_FORMS,
             f"--branches {self.branches!r}: choose one of {', '.join(BRANCH_FORMS)}.")
        need(self.memory_budget_mb is None or self.memory_budget_mb > 0,
             f"--memory-budget {self.memory_budget_mb}: must be a positive number of MB.")
        need(self.bits in BITS, f"--bits {self.bits}: choose 8 (keep int8) or 16 (widen int8 to int16).")
        need(0 < self.spsa_gain < 2 ** 16, f"--spsa-gain {self.spsa_gain}: must be in (0, 65536).")
        need(0 <= self.seed < 2 ** 32, f"--seed {self.seed}: must be in [0, 2**32) (the graph's seed input is 32-bit).")


    def _validate_node(self) -> None:
        refusal = self.node_refusal()
        if refusal:
            what = ("perturbs trained Gemm/MatMul/Conv outputs with ±1 noise in the stacked or loop branch form"
                    if self.estimator == "node" else "steps along the exact gradient at the logits in one forward")
            raise SpecError(f"--estimator {self.estimator} does not take {refusal} yet: it {what}. Drop "
                            f"{refusal.split()[0]}, or use --estimator sign.")

    def node_refusal(self, estimator: str | None = None) -> str | None:
        """The first option given that node perturbation (or the head estimator: `estimator`, else this
        spec's) does not take yet, or None. Node runs its branches stacked or in a Loop; head has none."""
        forms = ("auto", "stacked", "loop") if (estimator or self.estimator) == "node" else ("auto", "stacked")
        return next((flag for flag, on in (
            ("--perturbation " + self.perturbation, self.perturbation != "rademacher"),
            ("--momentum", self.momentum > 0), ("--sharpness", self.sharpness > 0),
            ("--kernel-norm", self.kernel_norm), ("--sparsity", self.sparsity > 0), ("--prompts", self.prompts > 0),
            ("--branches " + self.branches, self.branches not in forms)) if on), None)


def check_field_types(obj) -> None:
    """SpecError unless every field of the dataclass OBJ holds its annotated type, as the command line's
    types would give it: a bool is not an int, a float is not an int, a string is not a list of strings."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _holds(value, hints[f.name]):
            got = type(value).__name__
            if isinstance(value, (list, tuple)) and value:
                got += f" of {', '.join(sorted({type(v).__name__ for v in value}))}"
            raise SpecError(f"{type(obj).__name__}({f.name}={reprlib.repr(value)}): {f.name} takes "
                            f"{_describe(hints[f.name])}, not {got}.")


def _holds(value, hint) -> bool:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_holds(value, a) for a in args)
    if typing.get_origin(hint) is tuple:        # tuple[str, ...]: a tuple or list of them
        return isinstance(value, (tuple, list)) and all(_holds(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_describe(a) for a in args)
    if typing.get_origin(hint) is tuple:
        return f"a list of {args[0].__name__}"
    return "None" if hint is type(None) else f"an {hint.__name__}" if hint is int else f"a {hint.__name__}"
