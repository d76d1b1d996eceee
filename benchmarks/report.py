"""The benchmark results as Markdown tables and one PNG figure."""
from __future__ import annotations

import pathlib


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def baseline(budget: dict, row: dict) -> dict:
    """The fp32 backprop row of the tensors that a QZO-FF row trained (run.py: last layer, or --last N)."""
    last = row.get("options", {}).get("last", 1)
    return budget["backprop"] if last == 1 else budget["backprop_deep"][str(last)]


def _backprop_rows(budgets: dict) -> dict:
    """label -> {budget: backprop row}, for every trained depth measured."""
    first = next(iter(budgets.values()))
    depths = (["1"] if first["backprop"] else []) + list(first.get("backprop_deep", {}))
    return {("fp32 backprop (Adam)" if d == "1" else f"fp32 backprop (Adam) --last {d}"):
            {b: (r["backprop"] if d == "1" else r["backprop_deep"][d]) for b, r in budgets.items()} for d in depths}


def markdown(r: dict) -> str:
    mc = r["machine"]
    lines = [f"# fgcompile benchmarks{' (quick run)' if r.get('quick') else ''}", "",
             f"Machine: {mc['cpu']}, {mc['cores']} cores, {mc['platform']}; Python {mc['python']}, "
             + ", ".join(f"{k} {v}" for k, v in mc["packages"].items() if v)
             + f"; fgcompile {mc['fgcompile']} at {mc['commit']}; {mc['date']}. "
             f"onnxruntime and torch on {r['settings']['threads']} thread.", ""]
    if r.get("reused"):
        u = r["reused"]
        reused = ["the fp32 backprop rows (they do not depend on fgcompile; same data, seeds, order and lr grid)"] \
            if u.get("backprop_rows", True) else []
        reused += [f"the {', '.join(u['sections'])} sections, not re-run"] if u["sections"] else []
        lines += [f"Reused from the run of {u['commit']} ({u['date']}): {' and '.join(reused) or 'nothing'}."
                  + (f" {u['note']}." if u.get("note") else ""), ""]
    for name, res in r["models"].items():
        lines += [f"## {name}", ""]
        acc = res.get("accuracy")
        if acc:
            u = acc["untrained"]
            lines += ["Target-domain test accuracy, % (mean ± std over seeds"
                      f"{' ' + ','.join(map(str, r['settings']['seeds'])) if 'seeds' in r['settings'] else ''}; "
                      + (f"lr chosen by {r['settings']['folds']}-fold cross-validation on the target train split). "
                         if r["settings"].get("folds", 1) > 1 else "lr chosen on a validation split). ")
                      + f"Untrained: fp32 {_pct(u['fp32'])}, w8a8 {_pct(u['w8a8'])}, w16a8 {_pct(u['w16a8'])}.", ""]
            budgets = list(acc["budgets"])
            lines.append("| method | " + " | ".join(f"{b} epochs ({acc['budgets'][b]['examples']} examples)"
                                                   for b in budgets) + " |")
            lines.append("|---" * (len(budgets) + 1) + "|")
            keys = list(acc["budgets"][budgets[0]]["qzo_ff"])
            for k in keys:
                cells = []
                for b in budgets:
                    q = acc["budgets"][b]["qzo_ff"][k]
                    bp = baseline(acc["budgets"][b], q)["mean"]
                    gap = 100 * (q["mean"] - bp)
                    ex = q.get("exported")
                    gap_ex = f", exported {_pct(ex['mean'])} ({100 * (ex['mean'] - bp):+.1f})" if ex else ""
                    cells.append(f"{_pct(q['mean'])} ± {_pct(q['std'])} ({gap:+.1f} vs bp; lr {q['lr']:g}){gap_ex}")
                twin = acc["budgets"][budgets[0]]["qzo_ff"][k].get("same_graph_as")
                lines.append(f"| QZO-FF {k}{f' (the training graph of {twin})' if twin else ''} | "
                             + " | ".join(cells) + " |")
            for label, per_budget in _backprop_rows(acc["budgets"]).items():
                cells = [f"{_pct(per_budget[b]['mean'])} ± {_pct(per_budget[b]['std'])} (lr {per_budget[b]['lr']:g})"
                         for b in budgets]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
        cost = res.get("step_cost")
        if cost:
            lines += ["Step cost, µs per call (median of interleaved blocks). floor = prefix + 2m × suffix, "
                      "the split original model run as separate calls.", "",
                      "| variant | m | batch | forward | step | floor | step/forward | step/floor | step/(2m forwards) "
                      "| nodes | same step, branches cloned |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for c in cost:
                u = c["us"]
                f = c.get("branch_forms")
                cloned = f"{f['us']['cloned']:.0f} µs, {f['nodes']['cloned']} nodes (×{f['cloned_over_stacked']:.2f})" \
                    if f else "–"
                lines.append(f"| {c['variant']} | {c['m']} | {c['batch']} | {u['forward']:.0f} | {u['step']:.0f} | "
                             f"{u['floor']:.0f} | {c['step_over_forward']:.2f} | {c['step_over_floor']:.2f} | "
                             f"{c['step_over_2m_forwards']:.2f} | {c['train_nodes']} ({c['branches']}) | {cloned} |")
            lines.append("")
        mem = res.get("memory")
        if mem:
            lines += ["Peak resident memory, MB (VmHWM of a fresh process; in brackets: above the process "
                      "after its imports).", "",
                      "| variant | m | batch | inference | training (ORT session) | fgcompile Trainer | fp32 backprop (torch) "
                      "| training/inference | backprop/training |", "|---|---|---|---|---|---|---|---|---|"]
            for row in mem:
                cell = lambda j: f"{row[j]['peak_mb']:.0f} ({row[j]['model_mb']:.0f})"
                lines.append(f"| {row['variant']} | {row['m']} | {row['batch']} | {cell('inference')} | "
                             f"{cell('training')} | {cell('trainer')} | {cell('backprop')} | "
                             f"{row['training_over_inference']:.2f} | {row['backprop_over_training']:.2f} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(r: dict, path) -> pathlib.Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fgcompile import modelio
    names = list(r["models"])
    fig, axes = plt.subplots(len(names), 3, figsize=(16, 4.2 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        res = r["models"][name]
        ax = row[0]
        acc = res.get("accuracy")
        if acc:
            budgets = list(acc["budgets"])
            keys = list(acc["budgets"][budgets[0]]["qzo_ff"])
            bps = _backprop_rows(acc["budgets"])
            labels = ["untrained"] + [f"QZO-FF {k}" for k in keys] + list(bps)
            width = 0.8 / len(budgets)
            for i, b in enumerate(budgets):
                vals = [acc["untrained"]["w16a8"]] + [acc["budgets"][b]["qzo_ff"][k]["mean"] for k in keys] \
                    + [r[b]["mean"] for r in bps.values()]
                errs = [0] + [acc["budgets"][b]["qzo_ff"][k]["std"] for k in keys] + [r[b]["std"] for r in bps.values()]
                ax.barh([j + i * width for j in range(len(vals))], [100 * v for v in vals], width,
                        xerr=[100 * e for e in errs], label=f"{b} epochs")
            ax.set_yticks([j + width * (len(budgets) - 1) / 2 for j in range(len(labels))], labels, fontsize=8)
            ax.invert_yaxis()
            ax.set(xlabel="target test accuracy, %", title=f"{name}: accuracy")
            ax.legend(fontsize=8)
        cost = res.get("step_cost")
        if cost:
            ax = row[1]
            for variant in sorted({c["variant"] for c in cost}):
                for batch in sorted({c["batch"] for c in cost}):
                    pts = [c for c in cost if c["variant"] == variant and c["batch"] == batch]
                    ax.plot([c["m"] for c in pts], [c["step_over_forward"] for c in pts], "o-",
                            label=f"{variant} b{batch} step/forward")
                    ax.plot([c["m"] for c in pts], [c["step_over_floor"] for c in pts], "s--",
                            label=f"{variant} b{batch} step/floor")
            ax.axhline(1.2, color="grey", lw=0.8)
            ax.axhline(1.1, color="grey", lw=0.8, ls=":")
            ax.set(xlabel="m (perturbations per step)", ylabel="ratio", title=f"{name}: step cost")
            ax.legend(fontsize=7)
        mem = res.get("memory")
        if mem:
            ax = row[2]
            jobs = ["inference", "training", "trainer", "backprop"]
            for i, m in enumerate(mem):
                ax.bar([j + i * 0.8 / len(mem) for j in range(len(jobs))], [m[j]["peak_mb"] for j in jobs],
                       0.8 / len(mem), label=f"{m['variant']} batch {m['batch']}")
            ax.set_xticks([j + 0.4 - 0.4 / len(mem) for j in range(len(jobs))], jobs)
            ax.set(ylabel="peak RSS, MB", title=f"{name}: peak memory")
            ax.legend(fontsize=7)
        for ax in row:              # --only runs leave panels empty: hide them rather than draw blank axes
            if not ax.has_data():
                ax.axis("off")
    return modelio.save_figure(fig, path, dpi=90)
