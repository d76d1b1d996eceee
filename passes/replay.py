"""replay: the training graph cut at its step coefficients, so that a server can apply a device's step from
what the device sends, without its data and without a forward.

With weight perturbation a step's new state is a function of (state, seed, step, lr) and the m coefficients
cᵢ alone: zᵢ comes from the seeded hash, ĝ = Σᵢ cᵢ·zᵢ, then the integer update (passes/estimate.py,
passes/update.py). Feeding the cᵢ as an input in place of the losses and keeping only what the next state
needs leaves exactly those nodes, prng → the sum → update, so the replayed state equals the device's bit for
bit (the same integer ops). Node perturbation's step also reads the trained layers' inputs: it cannot replay.

Precondition: `train` is a training graph fgcompile compiled, with its contract (conformance probes) and a
weight-perturbation estimator.
Postcondition: a ModelProto whose inputs are coefficients (int32 [m]), seed, step, lr and the state, and
whose outputs are the next state (and `extra` tensors asked for); no data or labels input; it passes
onnx.checker and onnxruntime session creation (passes/finalize.to_model).
"""
from __future__ import annotations

import dataclasses
import json

import onnx
import onnx_graphsurgeon as gs

from fgcompile.artifact import Contract
from fgcompile.errors import SpecError
from .finalize import to_model

REPLAY_FORMAT = "fgcompile-replay/1"
COEFFICIENTS = "coefficients"


@dataclasses.dataclass(frozen=True)
class ReplayContract:
    """What replay.onnx takes and gives: the training contract it was cut from, and its coefficient input."""
    train: dict                  # the training graph's contract (Contract.to_dict)
    coefficients: str = COEFFICIENTS
    format: str = REPLAY_FORMAT

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def replayable(contract: Contract) -> str | None:
    """None when a step of this graph replays from its coefficients, else why not."""
    if contract.spec.estimator == "node":
        return ("--estimator node: a step also depends on the trained layers' inputs, which stay on the device; "
                "send the integer update instead")
    if contract.probes is None:
        return "compiled by an fgcompile without conformance probes; compile it again"
    return None


def replay_graph(train: onnx.ModelProto, contract: Contract, extra: tuple[str, ...] = ()) -> onnx.ModelProto:
    """The graph (cᵢ, seed, step, lr, state) → next state (+ `extra`) of a compiled training graph."""
    why = replayable(contract)
    if why:
        raise SpecError(f"this training graph cannot be replayed from its coefficients: {why}.")
    graph = gs.import_onnx(train)
    tensors = graph.tensors()
    c = tensors[contract.probes.coefficients]
    c.inputs.clear()                      # cut: its producer (the loss differences) goes with cleanup
    c.name = COEFFICIENTS
    io = contract.inputs
    inputs = [c] + [tensors[n] for n in (io.seed, io.step, io.lr)] + [tensors[s.name] for s in contract.state]
    outputs = [tensors[s.output] for s in contract.state] + [tensors[n] for n in extra]
    graph.inputs, graph.outputs = inputs, outputs
    graph.cleanup(remove_unused_graph_inputs=False)
    used = {t.name for node in graph.nodes for t in node.inputs} | {t.name for t in outputs}
    left = [n for n in [*contract.data_inputs, io.labels] if n in used]
    if left:   # an estimator whose step reads the data past its coefficients
        raise SpecError(f"this training graph's update reads {', '.join(left)} besides its coefficients: it cannot "
                        "be replayed; send the integer update instead.")
    return to_model(graph, inputs, outputs, ReplayContract(contract.to_dict()))
