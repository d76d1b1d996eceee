"""Training steps of a compiled graph, the way the numeric tests run them: one session, the feeds built
by the runtime's own step_feeds (so no test builds the seed/step/lr inputs by hand)."""
from fgcompile.modelio import with_outputs
from fgcompile.runtime.trainer import step_feeds
from fgcompile.session import SessionSettings, make_session


class Steps:
    """run = Steps(compiled); out = run(x, y, seed, step, lr_numerator, state) -> every output by name.
    optimization "disable" runs the ONNX ops as written, as the reference oracle does (qzoff.unfused);
    probes: internal tensors (e.g. contract.probes.z) to return beside the graph's outputs; threads:
    onnxruntime's intra-op threads (0: its default)."""

    def __init__(self, compiled, optimization: str = "disable", probes=(), threads: int = 0):
        self.compiled, self.contract = compiled, compiled.contract
        model = with_outputs(compiled.train, list(probes)) if probes else compiled.train
        self.sess = make_session(model, settings=SessionSettings(optimization=optimization, threads=threads))
        self.names = [o.name for o in self.sess.get_outputs()]

    def __call__(self, x, y, seed=0, step=0, lr_numerator=None, state=None) -> dict:
        """lr_numerator: the graph's int32 lr input (default: the compiled one); state: the compiled one."""
        numerator = self.contract.lr_numerator.default if lr_numerator is None else lr_numerator
        state = self.compiled.state if state is None else state
        return dict(zip(self.names, self.sess.run(None, step_feeds(self.contract, x, y, seed, step, numerator, state))))

    def next_state(self, out: dict) -> dict:
        """The state outputs of a step, named as the state inputs (to feed back)."""
        return {s.name: out[s.output] for s in self.contract.state}


def run_step(compiled, x, y, seed=0, step=0, lr_numerator=None, state=None, optimization: str = "disable") -> dict:
    """One step in a fresh session."""
    return Steps(compiled, optimization)(x, y, seed, step, lr_numerator, state)
