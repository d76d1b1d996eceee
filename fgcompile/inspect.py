"""inspect: the weight sites of a QDQ model and what training each would cost in memory.

Memory estimate for training one tensor of n elements with m perturbations on a b-byte grid
(b = 2 when int8 widens to int16):  n · (2b  state in/out  +  2m·b  branch weights  +  4·(m + 2)
int32 perturbations, counter and ĝ). Activations of the 2m branch copies are not included: they depend
on the batch, and the benchmarks measure them.
"""
from __future__ import annotations

import dataclasses

import onnx
import onnx_graphsurgeon as gs

from fgcompile.errors import ModelError, SpecError
from fgcompile.passes.analyze import find_weight_sites, is_quantized


def train_bytes(numel: int, grid_bytes: int, m: int) -> int:
    return numel * (2 * grid_bytes + 2 * m * grid_bytes + 4 * (m + 2))


@dataclasses.dataclass
class SiteRow:
    site: str
    op: str
    weight: str
    shape: tuple
    dtype: str
    axis: int | None
    params: int
    bias: str | None
    train_bytes: int


def inspect_model(model: onnx.ModelProto, m: int = 8, bits: int = 16) -> list[SiteRow]:
    if not 1 <= m <= 64:
        raise SpecError(f"--m {m}: the number of perturbations must be 1..64 (the memory estimate uses it).")
    graph = gs.import_onnx(model)
    if not is_quantized(graph):
        raise ModelError("the model is not quantized (no DequantizeLinear node): fgcompile trains QDQ "
                         "inference graphs. Quantize it first with onnxruntime.quantization.quantize_static "
                         "(quant_format=QuantFormat.QDQ).")
    rows = []
    for s in find_weight_sites(graph):
        grid = 2 if bits == 16 or s.weight.dtype == "int16" else 1
        n = s.weight.numel + (s.bias.numel if s.bias else 0)
        rows.append(SiteRow(s.name, s.op, s.weight.name, s.weight.shape, s.weight.dtype, s.weight.axis,
                            s.params, s.bias.name if s.bias else None, train_bytes(n, grid, m)))
    return rows


def format_table(rows: list[SiteRow]) -> str:
    head = ("site", "op", "weight", "shape", "dtype", "axis", "params", "bias", "train mem")
    body = [(r.site, r.op, r.weight, "x".join(map(str, r.shape)), r.dtype, "-" if r.axis is None else str(r.axis),
             str(r.params), r.bias or "-", _human(r.train_bytes)) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    total = sum(r.params for r in rows)
    return "\n".join([line(head)] + [line(b) for b in body] + [f"{len(rows)} weight sites, {total} parameters"])


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
