"""The text fgcompile prints, shared by the CLI and the demo: tables, and one-line summaries of a compile
and of an export."""
from __future__ import annotations

from fgcompile.artifact import Contract


def format_table(head, rows, right=()) -> list[str]:
    """Lines of a text table: each column as wide as its widest cell, two spaces apart; columns whose
    index is in `right` are right-aligned."""
    cells = [[str(c) for c in row] for row in [head, *rows]]
    widths = [max(len(c) for c in col) for col in zip(*cells)]
    align = lambda i, c, w: c.rjust(w) if i in right else c.ljust(w)
    return ["  ".join(align(i, c, w) for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in cells]


def describe_compile(contract: Contract) -> list[str]:
    """What a compile trains and how: one line per trained tensor and whitened site, then the options."""
    lines = [f"trains {s.name} ({s.role}, {s.dtype} {'x'.join(map(str, s.shape))}"
             f"{', widened from ' + s.source_dtype + ' x' + format(s.factor, 'g') if s.widened else ''})"
             for s in contract.parameters()]
    lines += [f"{p.site} reads its input whitened (frozen {p.matrix}, folded back on export)"
              for p in contract.precondition]
    sp, numerator = contract.spec, contract.lr_numerator
    lines.append(f"m={sp.m} eps={sp.eps} lr={sp.lr} ({numerator.default}/2^{numerator.shift}) "
                 f"{sp.perturbation} {sp.estimator} loss={sp.loss} on {contract.loss_tap}"
                 + ("" if contract.estimator_reason == "given" else f" (estimator auto: {contract.estimator_reason})"))
    options = [part for part in (
        "kernel-wise normalized ĝ" if sp.kernel_norm else "",
        f"sparse update ({sp.sparse_mode}): {sp.sparsity:.0%} of each tensor unchanged per step" if sp.sparsity else "",
        f"momentum-guided sampling ({sp.momentum:.0%} of z)" if sp.momentum else "",
        f"sharpness-aware ascent of {sp.sharpness} LSB" if sp.sharpness else "",
        "node schedule alternate: direction i perturbs layer i mod L alone" if sp.node_schedule == "alternate"
        else "") if part]
    if options:
        lines.append("; ".join(options))
    if contract.branches == "none":      # --estimator head
        lines.append("one clean forward a step (the exact gradient at the logits): no branches")
        return lines
    lines.append(f"2m={2 * sp.m} branches {contract.branches}"
                 + {"stacked": "", "loop": " (an ONNX Loop over the 2m branches: one branch's weights and activations at a time)"}.get(
                     contract.branches, f" (one copy per branch: {contract.branches_reason})")
                 + ("; activation requantization after the last trained-path Conv/MatMul/Gemm read as float"
                    if sp.requant_bypass else ""))
    return lines


def describe_eval(r: dict) -> str:
    """`fgcompile eval`'s line (runtime/evaluate.py's result); a Sigmoid head's adds AUC and the miss rate."""
    line = f"accuracy {r['accuracy']:.4f}  loss {r['loss']:.4f}"
    if "auc" in r:
        shown = lambda v: "n/a (one class in the data)" if v is None else f"{v:.4f}"
        line += f"  AUC {shown(r['auc'])}  miss rate {shown(r['miss_rate'])} at false-alarm rate {r['false_alarm']:g}"
    return f"{line}  ({r['samples']} samples)"


def describe_tune(record: dict) -> str:
    """What `fgcompile tune` chose and on what (runtime/tune.py's record)."""
    sp = record["split"]
    schedule = record.get("schedule", "constant")
    under = "the peak of a cosine schedule" if schedule == "cosine" else "constant schedule"
    on = (f"on {sp['validation']} held-out examples (seed {sp['seed']}; {sp['fit']} fit" if "folds" not in sp else
          f"by {sp['folds']}-fold cross-validation on {sum(sp['validation'])} examples (seed {sp['seed']}")
    return (f"lr {record['choice']['lr']:g} chosen of {', '.join(format(lr, 'g') for lr in record['grid'])} "
            f"({under}) {on}, {record['budget']['epochs']} epochs per run)")


def describe_export(r: dict) -> str:
    """One line per exported tensor (runtime/export.py's report)."""
    if not r["narrowed"]:
        return "written as trained"
    if "beyond_source_grid" not in r:
        return f"narrowed {r['narrowed']}: {r['inexact_fraction']:.1%} rounded"
    return (f"narrowed {r['narrowed']}{' (whitening folded back)' if r['preconditioned'] else ''}: "
            f"{r['inexact_fraction']:.1%} rounded (mean {r['mean_abs_rounding_lsb']:.2f} LSB), "
            f"{r['beyond_source_grid']:.1%} grew past the pretrained grid, "
            f"{r['rescaled_channels']:.0%} of channels rescaled")
