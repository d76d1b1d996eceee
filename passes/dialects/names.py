"""names: give every node a unique, non-empty name.

Unnamed nodes are valid ONNX (onnxruntime's quant_pre_process leaves dozens), but the passes key nodes by
name and clone suffixes as `name + suffix`, so two unnamed nodes would clone to one duplicate name.

Precondition: any graph.  Postcondition: node names are unique and non-empty; named nodes keep their
name unless it repeats an earlier one. Returns how many nodes were renamed.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs


def run(graph: gs.Graph) -> int:
    taken = {n.name for n in graph.nodes if n.name}
    seen, renamed = set(), 0
    for k, node in enumerate(graph.nodes):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{node.name or node.op}_{k}"
        name, j = base, 0
        while name in taken or name in seen:
            j += 1
            name = f"{base}_{j}"
        node.name = name
        seen.add(name)
        taken.add(name)
        renamed += 1
    return renamed
