"""plan: --estimator auto decides once, records why, and compiles exactly what the choice given by hand does."""
import onnx
from onnx import numpy_helper
import pytest

from conftest import shipped
from fgcompile.errors import SpecError
from fgcompile.passes.pipeline import compile_graph
from fgcompile.passes.plan import LONE_CONV_M, TOKEN_M
from fgcompile.report import describe_compile
from fgcompile.spec import DEFAULT_HEADROOM, DEFAULT_M, DETECTOR_HEADROOM, TrainSpec


def _same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """The same nodes, inputs, outputs and initializer values (a constant the plan read may be stored in
    another of TensorProto's encodings)."""
    def parts(m):
        inits = sorted((i.name, i.data_type, numpy_helper.to_array(i).tobytes()) for i in m.graph.initializer)
        return [n.SerializeToString() for n in m.graph.node], list(m.graph.input), list(m.graph.output), inits
    return parts(a) == parts(b)


@pytest.mark.parametrize("model_file, last, m, schedule", [
    ("digits_cnn/w8a8.onnx", 2, DEFAULT_M["node"], "all"),          # one layer perturbed (the output's is exact)
    ("digits_cnn/w8a8.onnx", 3, DEFAULT_M["node"], "all"),          # conv2 and fc1: not over tokens
    ("digits_attn/w8a8.onnx", 3, TOKEN_M, "alternate"),             # mlp1 and mlp2, over 8 tokens
])
def test_auto_trains_depth_with_node_perturbation(model_file, last, m, schedule):
    auto = compile_graph(shipped(model_file), TrainSpec(last=last))
    by_hand = compile_graph(shipped(model_file), TrainSpec(last=last, estimator="node", m=m, node_schedule=schedule))
    assert (auto.contract.spec.estimator, auto.contract.spec.m, auto.contract.spec.node_schedule) == \
        ("node", m, schedule)
    assert auto.contract.estimator_reason.startswith(f"{last} layers train")
    assert ("token axis" in auto.contract.estimator_reason) == (m == TOKEN_M)
    assert auto.contract.spec.lr == by_hand.contract.spec.lr and _same_graph(auto.train, by_hand.train)
    assert by_hand.contract.estimator_reason == "given"


@pytest.mark.parametrize("last, m, schedule", [(3, None, "alternate"), (3, 4, "all"), (7, None, "all"), (7, 32, "alternate")])
def test_node_alternates_over_tokens_where_each_layer_keeps_four_directions(last, m, schedule):
    """--node-schedule auto resolves for node given by hand too: alternate where m // L >= 4 of the L perturbed
    layers (the output layer's step is exact), m the one given or node's default."""
    contract = compile_graph(shipped("digits_attn/w8a8.onnx"), TrainSpec(last=last, estimator="node", m=m)).contract
    assert (contract.spec.m, contract.spec.node_schedule) == (m or DEFAULT_M["node"], schedule)
    said = "\n".join(describe_compile(contract))     # compile says which
    assert ("node schedule alternate" in said) == (schedule == "alternate")
    every = compile_graph(shipped("digits_attn/w8a8.onnx"), TrainSpec(last=3, estimator="node", node_schedule="all"))
    assert every.contract.spec.node_schedule == "all"


@pytest.mark.parametrize("model_file", ["digits_cnn/w8a8.onnx", "digits_attn/w8a8.onnx", "kws_dscnn/w8a8.onnx"])
def test_auto_trains_the_output_layer_with_its_exact_gradient(model_file):
    auto = compile_graph(shipped(model_file), TrainSpec())
    by_hand = compile_graph(shipped(model_file), TrainSpec(estimator="head"))
    assert (auto.contract.spec.estimator, auto.contract.spec.m) == ("head", 1)
    assert "output layer trains alone" in auto.contract.estimator_reason and _same_graph(auto.train, by_hand.train)


@pytest.mark.parametrize("options, why", [
    (dict(loss="mse"), "the head estimator cannot: --loss mse"),
    (dict(train=("fc1",), momentum=0.25), "one hidden layer trains, and node perturbation cannot: it does not take --momentum"),
    (dict(m=32), "--m 32 is given"),
    (dict(momentum=0.25), "the head estimator cannot: it does not take --momentum"),
])
def test_auto_keeps_weight_perturbation_where_one_layer_is_not_the_head(options, why):
    """Where the trained layer is not the output of a ce loss (the head estimator's, or one it measured worse
    on) or the options ask for perturbations."""
    auto = compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(**options))
    by_hand = compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(estimator="sign", **options))
    assert auto.contract.spec.estimator == "sign" and why in auto.contract.estimator_reason
    assert _same_graph(auto.train, by_hand.train)


@pytest.mark.parametrize("model_file, site, m", [("digits_cnn/w8a8.onnx", "fc1", DEFAULT_M["node"]),
                                                 ("digits_attn/w8a8.onnx", "mlp1", TOKEN_M),
                                                 ("digits_cnn/w8a8.onnx", "conv2", LONE_CONV_M),
                                                 ("kws_dscnn/w8a8.onnx", "block3.pw", LONE_CONV_M)])
def test_auto_trains_a_lone_hidden_layer_with_node_perturbation(model_file, site, m):
    """One hidden layer: node (98.2% against sign's 82.0% at digits_cnn's fc1; m = 16 at a Conv and over a
    transformer's tokens), as by hand."""
    auto = compile_graph(shipped(model_file), TrainSpec(train=(site,)))
    by_hand = compile_graph(shipped(model_file), TrainSpec(train=(site,), estimator="node", m=m))
    assert (auto.contract.spec.estimator, auto.contract.spec.m) == ("node", m)
    assert "one hidden" in auto.contract.estimator_reason
    assert auto.contract.spec.lr == by_hand.contract.spec.lr and _same_graph(auto.train, by_hand.train)


@pytest.mark.parametrize("options, why", [
    (dict(momentum=0.25), "does not take --momentum"),
    (dict(branches="cloned"), "does not take --branches cloned"),
    (dict(perturbation="ternary"), "does not take --perturbation ternary"),
])
def test_auto_falls_back_to_sign_and_says_why(options, why):
    contract = compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(last=2, **options)).contract
    assert contract.spec.estimator == "sign" and why in contract.estimator_reason


def test_auto_keeps_node_in_the_loop_form():
    """--branches loop at depth: node perturbation runs its branches in the Loop (memory near inference)."""
    contract = compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(last=2, branches="loop")).contract
    assert contract.spec.estimator == "node" and contract.branches == "loop"


def test_auto_falls_back_where_node_cannot_perturb_a_site():
    """A site node perturbation does not take (here a normalization's scale, not a layer's output)."""
    contract = compile_graph(shipped("digits_attn/w8a8.onnx"), TrainSpec(train=("ln", "head"))).contract
    assert contract.spec.estimator == "sign" and "trains scale tensors" in contract.estimator_reason


def test_auto_falls_back_at_a_site_node_refuses():
    """conv2 with auto_pad (node takes explicit pads only): auto trains --last 3 with Sign-m-SPSA and says why."""
    model = shipped("digits_cnn/w8a8.onnx")
    conv2 = next(n for n in model.graph.node if n.name == "conv2")
    kept = [a for a in conv2.attribute if a.name != "pads"]
    del conv2.attribute[:]
    conv2.attribute.extend(kept + [onnx.helper.make_attribute("auto_pad", "SAME_UPPER")])
    contract = compile_graph(model, TrainSpec(last=3)).contract
    assert contract.spec.estimator == "sign"
    assert contract.estimator_reason == "node perturbation: site 'conv2' is a Conv with auto_pad 'SAME_UPPER' " \
                                        "(explicit pads only)"


def test_a_given_m_wins_over_the_estimators_default():
    contract = compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec(last=2, m=16)).contract
    assert (contract.spec.estimator, contract.spec.m) == ("node", 16)


def test_auto_trains_a_detector_head_by_its_exact_gradient_on_a_wide_grid():
    """A one-logit detector's lone output layer: head, at headroom 128 unless --headroom is given, as at depth
    and at a lone hidden layer where node trains; a head of several Sigmoid labels keeps Sign-m-SPSA (unmeasured
    there), and other compiles (Sign-m-SPSA's included) keep headroom 4."""
    import qdq_graphs
    detector = shipped("kws_detect/w8a8.onnx")
    contract = compile_graph(detector, TrainSpec()).contract
    assert (contract.spec.estimator, contract.spec.headroom) == ("head", DETECTOR_HEADROOM)
    assert compile_graph(detector, TrainSpec(headroom=8)).contract.spec.headroom == 8
    assert compile_graph(detector, TrainSpec(estimator="sign")).contract.spec.headroom == DEFAULT_HEADROOM
    assert compile_graph(detector, TrainSpec(last=2)).contract.spec.headroom == DETECTOR_HEADROOM
    lone = compile_graph(detector, TrainSpec(train=("block2.pw",))).contract.spec
    assert (lone.estimator, lone.headroom) == ("node", DETECTOR_HEADROOM)
    assert compile_graph(detector, TrainSpec(train=("block2.pw",), estimator="sign")).contract.spec.headroom == \
        DEFAULT_HEADROOM
    assert compile_graph(detector, TrainSpec(last=2, estimator="sign")).contract.spec.headroom == DEFAULT_HEADROOM
    multi = compile_graph(qdq_graphs.dense_chain(0, widths=(6, 8, 3), sigmoid=True), TrainSpec()).contract
    assert multi.spec.estimator == "sign" and "several Sigmoid labels" in multi.estimator_reason
    assert compile_graph(shipped("digits_cnn/w8a8.onnx"), TrainSpec()).contract.spec.headroom == DEFAULT_HEADROOM
    with pytest.raises(SpecError, match=r"--headroom 3: choose a power of two 1\.\.256, or auto"):
        TrainSpec(headroom=3)
