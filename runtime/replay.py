"""replay: a compiled training graph cut at its step coefficients, so that a server can apply a device's step
from what the device sends, without its data and without a forward.

With weight perturbation a step's new state is a function of (state, seed, step, lr) and the m coefficients
cᵢ alone: zᵢ comes from the seeded hash, ĝ = Σᵢ cᵢ·zᵢ, then the integer update (passes/estimate.py,
passes/update.py). Feeding the cᵢ as an input in place of the losses and keeping only what the next state
needs leaves exactly those nodes, prng → the sum → update, so the replayed state equals the device's bit for
bit (the same integer ops). Node perturbation's step also reads the trained layers' inputs: it cannot replay.

Takes: a training graph fgcompile compiled, with its contract (conformance probes) and a weight-perturbation
estimator. Gives: a ModelProto whose inputs are the coefficients (int32 [m], named as the contract's
probes.coefficients), seed, step, lr and the state, and whose outputs are the next state (and `extra`
tensors asked for); no data or labels input; it passes onnx.checker and loads in onnxruntime.
"""
from __future__ import annotations

import json

import onnx

from fgcompile.artifact import METADATA_KEY, Contract
from fgcompile.errors import SpecError
from fgcompile.spec import READS_ACTIVATIONS
from fgcompile.session import make_session

REPLAY_FORMAT = "fgcompile-replay/1"


def replayable(contract: Contract) -> str | None:
    """None when a step of this graph replays from its coefficients, else why not."""
    if contract.spec.estimator in READS_ACTIVATIONS:
        return (f"--estimator {contract.spec.estimator}: a step also depends on the trained layers' inputs, which "
                "stay on the device; "
                "send the integer update instead")
    if contract.probes is None:
        return "compiled by an fgcompile without conformance probes; compile it again"
    return None


def replay_graph(train: onnx.ModelProto, contract: Contract, extra: tuple[str, ...] = ()) -> onnx.ModelProto:
    """The graph (cᵢ, seed, step, lr, state) → next state (+ `extra`) of a compiled training graph."""
    why = replayable(contract)
    if why:
        raise SpecError(f"this training graph cannot be replayed from its coefficients: {why}.")
    io = contract.inputs
    inputs = [contract.probes.coefficients, io.seed, io.step, io.lr] + [s.name for s in contract.state]
    outputs = [s.output for s in contract.state] + list(extra)
    model = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(train)).extract_model(inputs, outputs)
    left = sorted(_read(model.graph) & {*contract.data_inputs, io.labels})
    if left:   # an estimator whose step reads the data past its coefficients
        raise SpecError(f"this training graph's update reads {', '.join(left)} besides its coefficients: it cannot "
                        "be replayed; send the integer update instead.")
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(
        {"format": REPLAY_FORMAT, "coefficients": contract.probes.coefficients, "train": contract.to_dict()},
        sort_keys=True)})
    onnx.checker.check_model(model, full_check=True)
    make_session(model)
    return model


def _read(graph: onnx.GraphProto) -> set:
    """Every tensor name the graph's nodes read, in subgraphs too."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names |= _read(g)
    return names
