"""TrainState: where a training run stands, as one immutable value.

    tensors    every state tensor the graph carries, named as its inputs: the trained integer weights and
               biases and, with momentum, their buffers (contract.state; role tells them apart)
    step       the number of steps taken: the next step is step k = `step`, fed with (seed, k)
    bad_steps  of those, the steps whose loss was NaN or Inf (their tensors were kept)

A new step makes a new TrainState (runtime/step.py); nothing changes one in place: `tensors` is a
read-only mapping of read-only array views, so a state kept from before a step is still that state after it.
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)   # eq=False: arrays have no single truth value
class TrainState:
    tensors: Mapping[str, np.ndarray]
    step: int = 0
    bad_steps: int = 0

    def __post_init__(self):
        object.__setattr__(self, "tensors", MappingProxyType({k: _read_only(v) for k, v in self.tensors.items()}))


def _read_only(a: np.ndarray) -> np.ndarray:
    """A view of `a` that cannot be written (the caller's array keeps its own flags)."""
    view = np.asarray(a).view()
    view.flags.writeable = False
    return view
