"""rate: which learning rate and schedule a run takes (runtime/loop.py's Plan moves lr_k along the schedule).

    peak      --lr as given, else OUT/tune.json's choice (a folder's), else the compiled rate
    schedule  --schedule as given, else tune.json's choice, else RunDefaults.schedule
The peak is the graph's int32 lr input (a numerator over 2**shift), so another rate needs no recompile.
"""
from __future__ import annotations

from fgcompile.artifact import LAYOUT, Contract
from fgcompile.errors import DataError, SpecError
from fgcompile.spec import RunDefaults
from . import tune


def choose(contract: Contract, lr: float | None, schedule: str | None, epochs: int, out=None,
           train_sha256: str | None = None) -> tuple[int, str, str | None]:
    """(peak numerator, schedule, a note) of a run: each as given, else OUT/tune.json's choice (the note
    says which, and warns when the run's epochs or schedule are not the ones it was tuned for: the best
    rate moves with the budget), else the compiled rate and RunDefaults.schedule. out: None in memory."""
    c = contract.lr_numerator
    if lr is not None:
        numerator = c.of(lr)
        if not 1 <= numerator <= c.max:
            raise SpecError(f"--lr {lr}: the graph takes rates from 2**-{c.shift} to {c.max / (1 << c.shift):g} "
                            "LSBs per unit of ĝ (its int32 lr input over 2**shift). Pass a rate in that range.")
    choice = tune.read_choice(out, train_sha256) if out is not None and (lr is None or schedule is None) else None
    if choice is None:
        return (c.default if lr is None else numerator), schedule or RunDefaults.schedule, None
    taken = []
    if lr is None:
        if not 1 <= choice["lr_numerator"] <= c.max:
            raise DataError(f"{out / LAYOUT.tune}: its rate {choice['lr_numerator']} is outside the graph's "
                            f"[1, {c.max}]. Run `fgcompile tune` again, or delete the file.")
        numerator = choice["lr_numerator"]
        taken.append(f"lr {choice['lr']:g}")
    if schedule is None:
        schedule = choice["schedule"]
        taken.append(f"the {schedule} schedule")
    other = f"; tuned under the {choice['schedule']} schedule, not {schedule}" \
        if lr is None and schedule != choice["schedule"] else ""
    note = (f"{' and '.join(taken)} from {out / LAYOUT.tune} (chosen by fgcompile tune{other}; compiled lr: "
            f"{c.default / (1 << c.shift):g}; --lr/--schedule override)")
    if lr is None and choice["epochs"] not in (None, epochs):
        note += (f". Warning: that rate was tuned for {choice['epochs']} epochs and this run trains {epochs}; the "
                 f"best rate moves with the budget: run `fgcompile tune {out} --data TRAIN.npz --epochs "
                 f"{epochs}` first")
    return numerator, schedule, note
