"""The update path (perturbation, estimate, update, clip) is integer arithmetic: only the m loss
coefficients cross from float to int, or with the ce loss the logits themselves, onto integer_loss's grid."""
import onnx
import pytest

from conftest import shipped
from fgcompile.passes.pipeline import compile_graph
from fgcompile.spec import TrainSpec

INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
             onnx.TensorProto.INT32,
             onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.BOOL}


def elem_types(model):
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def ancestors(model, names, stop=()):
    """Nodes that `names` depend on; the walk does not pass through nodes named in `stop`."""
    producer = {o: n for n in model.graph.node for o in n.output}
    seen, stack = {}, list(names)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in seen and node.name not in stop:
            seen[node.name] = node
            stack.extend(node.input)
    return seen


def descendants(model, names):
    reached, nodes, changed = set(names), {}, True
    while changed:
        changed = False
        for n in model.graph.node:
            if n.name not in nodes and any(i in reached for i in n.input):
                nodes[n.name] = n
                reached.update(n.output)
                changed = True
    return nodes


@pytest.mark.parametrize("spec", [TrainSpec(estimator="sign"), TrainSpec(m=3, perturbation="ternary", density=0.1, bits=8),
                                  TrainSpec(rounding="stochastic", perturbation="gaussian", last=2, estimator="sign"),
                                  TrainSpec(estimator="spsa", loss="mse"),
                                  TrainSpec(kernel_norm=True, sparsity=0.9, last=2, estimator="sign"),
                                  TrainSpec(sparsity=0.5, sparse_mode="random", momentum=0.5, sharpness=4)])
@pytest.mark.parametrize("model_file", ["digits_cnn/w8a8.onnx", "digits_attn/w8a8.onnx"])
def test_update_path_is_integer(model_file, spec):
    model = compile_graph(shipped(model_file), spec).train
    c = {p.key: p.value for p in model.metadata_props}
    import json
    contract = json.loads(c["fgcompile"])
    types = elem_types(model)
    state_out = [s["output"] for s in contract["state"]]
    float_in = {n.name for n in model.graph.node
                if n.op_type in ("Cast", "Less") and types.get(n.input[0]) == onnx.TensorProto.FLOAT}
    update_path = ancestors(model, state_out, stop=float_in)
    assert len(update_path) > 10
    for node in update_path.values():
        for out in node.output:
            assert types[out] in INT_TYPES, f"{node.op_type} {node.name} -> {out} is not integer"
    # the only float values the update reads are the m coefficients, cast to int32 of shape [m]
    crossing = [n for n in model.graph.node if n.name in float_in
                and any(o in i for i in [x.input for x in update_path.values()] for o in n.output)]
    assert crossing, "the update must depend on the losses"
    if spec.loss != "mse":      # ce: the logits' grid q and their finiteness (passes/integer_loss.py)
        assert sorted(n.op_type for n in crossing) == ["Cast", "Less"]
        assert all(n.name.startswith("integer_loss/") for n in crossing)
    for node in (crossing if spec.loss == "mse" else []):
        vi = next(v for v in model.graph.value_info if v.name == node.output[0])
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        assert types[node.output[0]] == onnx.TensorProto.INT32 and dims == [contract["spec"]["m"]]
    # the perturbed weights W± (one [2m, *shape] tensor per trained tensor), and everything that builds
    # them, are integer
    branch_weights = [o for n in model.graph.node if n.name.startswith("pair/") and ".perturbed" in n.name
                      for o in n.output]
    params = [s for s in contract["state"] if s["role"] != "momentum"]   # a momentum buffer is not perturbed
    assert len(branch_weights) == len(params)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    assert sorted(shapes[w][0] for w in branch_weights) == [2 * contract["spec"]["m"]] * len(params)
    assert all(types[w] in INT_TYPES for w in branch_weights)
    perturbation_path = ancestors(model, branch_weights)
    assert any(n.op_type == "BitwiseXor" for n in perturbation_path.values())
    for node in perturbation_path.values():
        for out in node.output:
            assert types[out] in INT_TYPES, f"{node.op_type} {node.name} -> {out} is not integer"
