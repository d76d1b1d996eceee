"""`fgcompile inspect`: every parameter fgcompile can train in a model, its training grid and what
training it would cost in memory, and the layers whose weights stay float (with why).

The model is canonicalized first (passes/canonicalize.py), so QOperator, dynamic, fake-quant and int4
exports list the sites they compile to. Parameter kinds: Conv/Gemm/MatMul weights, their biases (int32
through DequantizeLinear, an 8-bit or float Add after MatMul), and LayerNormalization/BatchNormalization
scale and bias (quantized or float). Grids: 8-bit weights and Add biases widen to 16 bits with
--bits 16 (W·256, s/256); int32 biases move in strides of 2^k ≈ 1/s_in LSBs; float parameters train on
passes/floatgrid.py's int32 grid (s = 2^(⌈log2 max|P|⌉−27), strides of 2^12).

Memory estimate for training one tensor of n elements with m perturbations on a b-byte grid, per branch
form (what the step holds beyond inference):
    n · (2b state in/out + 18·rows int32 perturbations z [rows, n] and the hash words alive beside them
         + 8 ĝ and update + copies · (12 + b) perturbed weights: int32 W ± εz, its clip, the b-byte
         cast and the float dequantization)
with rows = m, copies = 2m when the branches are stacked or cloned, and for --branches loop rows = 1,
copies = 1 (each zᵢ is drawn inside the Loop, one branch per iteration) and 8 more bytes for ĝ (carried
through the Loop, an iteration's input and output alive at once). A large tensor (more than 2^16
elements) is perturbed in its own dtype. Stacked:
    n · (2b state in/out + 4·m z (int8), its m rows, MatMulInteger's packed copy and the hash bytes
         + 8 ĝ and update + copies · (2b + 8) perturbed weights in b bytes, their int8 steps and float
         dequantization)
with copies = 2 for a Conv weight (each branch's kernel is built alone, just before its Conv) and 2m for
a MatMul/Gemm weight (the wide product reads all branches at once). Loop, updated in row chunks:
    n · (2b state in/out + b the update's chunks before onnxruntime concatenates them + b + 3 the
         perturbed copy, its int8 rooms to the grid's ends and zᵢ (int8) with its hash + 4 the float
         kernel (whole for a MatMul/Gemm; a Conv dequantizes a piece at a time) + 2 ĝ carried in int8
         where the update cannot sum it chunk by chunk)  = n · (4b + 9)
(ResNet-18's layer4 convs, 2.4M weights at m = 8: 153 MiB stacked and 38 MiB loop; measured about 128 and
16-20 MiB above inference, benchmarks/results/deep-stacked-memory.md and deep-loop-narrow.md.) Activations
of the branches are not included: they depend on the batch (stacked: 2m·B rows through the suffix; loop:
B), and benchmarks/deep.py measures them.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fgcompile.modelio import human_bytes
from fgcompile.grid import WIDENING, training_grid
from fgcompile.report import format_table
from fgcompile.spec import DEFAULT_HEADROOM, DEFAULT_M, TrainSpec
from fgcompile.passes import canonicalize, floatgrid
from fgcompile.passes.analyze import check_quantized, find_weight_sites
from fgcompile.passes.dialects import unsupported
from fgcompile.passes.formulas import bias_stride, train_bytes
from fgcompile.passes.pipeline import check_source

RECURRENT = ("LSTM", "GRU", "RNN")


@dataclasses.dataclass
class ParamRow:
    site: str
    op: str
    role: str            # weight | bias | scale
    tensor: str
    shape: tuple
    dtype: str
    axis: int | None
    params: int
    grid: str            # the grid it trains on
    train_bytes: int     # stacked (or cloned) branches
    loop_bytes: int      # --branches loop
    note: str = ""       # e.g. a kernel that looks like a fixed transform


@dataclasses.dataclass
class FloatLayer:
    node: str
    op: str
    tensors: list[str]
    why: str
    kind: str = "recurrent"   # "recurrent", or passes/dialects/unsupported.py's pattern


def _grid(graph: gs.Graph, site, tensor, role: str, bits: int, headroom: int) -> tuple[str, int]:
    """(description, bytes per element) of the grid `tensor` trains on."""
    if tensor.dtype == "float32":
        values = graph.tensors()[tensor.name].values
        e = int(np.log2(floatgrid.grid_scale(values))) + floatgrid.MANTISSA_SHIFT
        return f"float → int32·2^{e - floatgrid.MANTISSA_SHIFT}, stride 2^12", 4
    grid = training_grid(tensor.dtype, bits, headroom) if role == "weight" else \
        training_grid(tensor.dtype, bits, 1) if tensor.dtype in ("int8", "uint8") else None
    if grid is not None:
        return f"{grid.dtype} (·{grid.factor:g}, s/{grid.factor:g}; range x{headroom if role == 'weight' else 1})", 2
    if tensor.dtype == "int32" and role == "bias":
        # a widened product weight scales its int32 bias with it (s_w/s_b stays); a norm scale does not
        widening = WIDENING if site.kind == "norm" and training_grid(site.weight.dtype, bits, 1) is not None else 1
        tensors = graph.tensors()
        stride = bias_stride(tensors[site.weight.scale_name].values, tensors[tensor.scale_name].values, widening)
        return f"int32, stride {stride}", 4
    return tensor.dtype, np.dtype(tensor.dtype).itemsize


FIXED_TAPS = 64          # a learned Conv kernel rarely spans 64 samples of one channel; an STFT basis does
INPUT_PATH = ("QuantizeLinear", "DequantizeLinear", "Cast", "Reshape", "Unsqueeze")


def fixed_transform(graph: gs.Graph, site) -> str:
    """A note when the Conv `site` looks like a fixed basis (an STFT or filterbank written as a Conv): no
    bias, one input channel per group, at least FIXED_TAPS taps, reading a model input through nothing but
    Q/DQ, Cast and reshapes. A heuristic: it only suggests --freeze."""
    w = site.weight
    if site.op != "Conv" or site.bias is not None or len(w.shape) < 3 or w.shape[1] != 1 \
            or int(np.prod(w.shape[2:])) < FIXED_TAPS:
        return ""
    x = next(n for n in graph.nodes if n.name == site.name).inputs[0]
    while x.inputs and x.inputs[0].op in INPUT_PATH:
        x = x.inputs[0].inputs[0]
    if x not in graph.inputs:
        return ""
    return (f"{site.name} (Conv {'x'.join(map(str, w.shape))}, no bias, on the model input {x.name!r}) looks like a "
            f"fixed transform (an STFT or filterbank basis); if it is one, keep it out of training with "
            f"--freeze '^{site.name}$'")


def float_layers(graph: gs.Graph, sites=()) -> list[FloatLayer]:
    """Every layer with weights that does not train: recurrent layers, whose weights no common quantizer
    quantizes, and each Conv/Gemm/MatMul (or leftover integer/QOperator product) that is not among
    `sites`, with unsupported.py's reason. With the sites, this accounts for every product."""
    rows = []
    for node in graph.nodes:
        consts = [t.name for t in node.inputs if isinstance(t, gs.Constant) and t.values.dtype == np.float32
                  and t.values.ndim >= 2]
        if node.op in RECURRENT and consts:
            rows.append(FloatLayer(node.name, node.op, consts, "recurrent weights stay float: onnxruntime's "
                                   "quantizers (static and dynamic) leave LSTM/GRU/RNN weights unquantized, and "
                                   "fgcompile trains integer-grid parameters on products and normalizations only"))
    for node, pattern, detail in unsupported.reasons(graph, sites):
        rows.append(FloatLayer(node.name, node.op, [node.inputs[1].name], unsupported.describe(pattern, detail),
                               pattern))
    return rows


def inspect_graph(model: onnx.ModelProto, m: int = DEFAULT_M["sign"], bits: int = TrainSpec.bits,
                  headroom: int = DEFAULT_HEADROOM, momentum: float = TrainSpec.momentum,
                  sharpness: int = TrainSpec.sharpness) -> tuple[list[ParamRow], list[FloatLayer]]:
    TrainSpec(m=m, momentum=momentum, sharpness=sharpness)   # the same checks and messages as compile
    check_source(model)   # what compile refuses first (an invalid graph, opset), inspect refuses too
    graph = gs.import_onnx(canonicalize.canonical(model)[0])
    check_quantized(graph)
    rows, sites = [], find_weight_sites(graph)
    for s in sites:
        for role, t in (("weight" if s.kind == "product" else "scale", s.weight), ("bias", s.bias)):
            if t is None:
                continue
            grid, size = _grid(graph, s, t, role, bits, headroom)
            cost = [train_bytes(t.numel, size, m, loop, momentum, sharpness, conv=s.op == "Conv") for loop in (False, True)]
            note = fixed_transform(graph, s) if role == "weight" else ""
            rows.append(ParamRow(s.name, s.op, role, t.name, t.shape, t.dtype, t.axis, t.numel, grid, *cost, note))
    return rows, float_layers(graph, sites)


def inspect_model(model: onnx.ModelProto, m: int = DEFAULT_M["sign"], bits: int = TrainSpec.bits,
                  headroom: int = DEFAULT_HEADROOM, momentum: float = TrainSpec.momentum,
                  sharpness: int = TrainSpec.sharpness) -> list[ParamRow]:
    return inspect_graph(model, m, bits, headroom, momentum, sharpness)[0]


def format_inspection(rows: list[ParamRow], floats: list[FloatLayer] = ()) -> str:
    head = ("site", "op", "role", "tensor", "shape", "dtype", "axis", "params", "trains on", "train mem",
            "loop mem")
    body = [(r.site, r.op, r.role, r.tensor, "x".join(map(str, r.shape)) or "scalar", r.dtype,
             "-" if r.axis is None else str(r.axis), str(r.params), r.grid, human_bytes(r.train_bytes),
             human_bytes(r.loop_bytes)) for r in rows]
    sites = {r.site for r in rows}
    norms = {r.site for r in rows if r.role == "scale"}
    total = sum(r.params for r in rows)
    out = format_table(head, body)
    out.append(f"{len(sites) - len(norms)} weight sites, {len(norms)} normalization sites, {total} parameters "
               "(normalization sites train when named with --train)")
    out += [f"note: {r.note}" for r in rows if r.note]
    out += [f"{'no weight' if f.kind == 'activations' else 'stays float'}: {f.node} ({f.op}: {', '.join(f.tensors)}): "
            f"{f.why}" for f in floats]
    return "\n".join(out)
