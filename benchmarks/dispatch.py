"""onnxruntime's fixed cost per node and per graph input/output, the unit the step-cost analysis uses.

    python benchmarks/dispatch.py

Times chains of N tiny Add nodes (10 floats) against a single node, and graphs with k inputs passed
through as outputs against one, on one thread with graph optimizations off (so the chain stays N
nodes). The slope is what each extra node or extra input/output costs a training step.
"""
from __future__ import annotations

import numpy as np
from fgcompile.session import SessionSettings, make_session
from onnx import TensorProto, helper

from step_cost import timed


def _chain(nodes: int, ios: int):
    names = [f"in{k}" for k in range(ios)]
    graph_nodes, prev = [], names[0]
    for i in range(nodes):
        graph_nodes.append(helper.make_node("Add", [prev, "one"], [f"t{i}"]))
        prev = f"t{i}"
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [10])
    outputs = [prev] + [f"out{k}" for k in range(1, ios)]
    graph_nodes += [helper.make_node("Identity", [names[k]], [f"out{k}"]) for k in range(1, ios)]
    graph = helper.make_graph(graph_nodes, "chain", [vi(n) for n in names], [vi(n) for n in outputs],
                              [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    sess = make_session(model, settings=SessionSettings(threads=1, optimization="disable"))
    feeds = {n: np.zeros(10, np.float32) for n in names}
    return lambda: sess.run(None, feeds)


def measure(repeats: int = 7, calls: int = 1000) -> dict:
    t = timed({"1 node": _chain(1, 1), "101 nodes": _chain(101, 1), "1 input/output": _chain(1, 1),
                "9 inputs/outputs": _chain(1, 9)}, repeats, calls)
    return {"us": {k: round(v, 2) for k, v in t.items()},
            "per_node_us": round((t["101 nodes"] - t["1 node"]) / 100, 3),
            # each extra input comes with one output (an Identity, itself a node)
            "per_input_output_pair_us": round((t["9 inputs/outputs"] - t["1 input/output"]) / 8, 3)}


if __name__ == "__main__":
    r = measure()
    for k, v in r["us"].items():
        print(f"{k:18s} {v:8.2f} us per run")
    print(f"per extra node: {r['per_node_us']:.3f} us; per extra input+output (+ an Identity): "
          f"{r['per_input_output_pair_us']:.3f} us")
