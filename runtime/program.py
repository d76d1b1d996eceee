"""Program: a compiled training graph made ready to run: its train and eval sessions, its contract and
its initial state, from a compiled folder or from compile_model's in-memory result.

Nothing in a Program changes while it trains (the state is a separate TrainState, runtime/state.py), so
one Program serves every run of a graph: tune's trials, a resume, another seed (`with_seed`).
`where` names the files in messages: OUT/train.onnx, or "the in-memory training graph".
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from types import MappingProxyType
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from fgcompile import folder, heads, modelio, validate
from fgcompile.artifact import LAYOUT, Compiled, Contract
from fgcompile.errors import ModelError
from fgcompile.session import SessionSettings, class_count, input_dtype, input_shape, make_session, running
from fgcompile.spec import TrainSpec
from . import checkpoint
from .data import read
from .metrics import score


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    contract: Contract
    spec: TrainSpec              # the contract's, but for the seed of a tune trial (with_seed)
    train: ort.InferenceSession
    eval: ort.InferenceSession
    initial: Mapping[str, np.ndarray]   # the state compile wrote: OUT/state.npz or Compiled.state
    where: dict                  # {"train": ..., "eval": ...}: the file each session runs, for messages
    train_sha256: str | None     # of OUT/train.onnx; None in memory
    probabilities: bool          # eval's output is a Softmax's (its loss is the negative log)

    @classmethod
    def of_folder(cls, out: pathlib.Path, session: SessionSettings, recover: bool = True, probes: tuple = ()) -> Program:
        """The Program of a compiled folder; ModelError when it holds no training graph. recover: first undo
        what a killed run left (not on a Ray worker, whose process ids are another host's). probes: internal
        tensors the train session outputs too (the contract's probes.coefficients, for runtime/fleet.py)."""
        if recover:
            folder.recover(out)
        if not (out / LAYOUT.train).is_file():
            raise ModelError(f"{out}: no {LAYOUT.train} here. Run `fgcompile compile MODEL.onnx -o {out}` first.")
        train_model, contract, sha = open_train_graph(out)
        train = session_of(modelio.with_outputs(train_model, list(probes)) if probes else train_model, out / LAYOUT.train,
                           session=session, training=True)
        eval_model = modelio.load_model(out / LAYOUT.eval)
        eval_session = session_of(eval_model, out / LAYOUT.eval, session=session, arithmetic=scores_arithmetic(contract))
        initial, _ = checkpoint.load(out / LAYOUT.state, contract, sha)
        return cls(contract, contract.spec, train, eval_session, MappingProxyType(initial),
                   {"train": out / LAYOUT.train, "eval": out / LAYOUT.eval}, sha,
                   heads.head_of(eval_model).probabilities)

    @classmethod
    def of_compiled(cls, compiled: Compiled, session: SessionSettings) -> Program:
        """The Program of compile_model's result (nothing is read or written)."""
        contract = validate.parse_contract(compiled.train, "the in-memory training graph")
        where = {"train": "the in-memory training graph", "eval": "the in-memory eval graph"}
        return cls(contract, contract.spec, session_of(compiled.train, where["train"], session=session, training=True),
                   session_of(compiled.eval, where["eval"], session=session, arithmetic=scores_arithmetic(contract)),
                   MappingProxyType(dict(compiled.state)),
                   where, None, heads.head_of(compiled.eval).probabilities)

    def with_seed(self, seed: int) -> Program:
        """The same graph and sessions, run with another seed (perturbations and batch order)."""
        return dataclasses.replace(self, spec=dataclasses.replace(self.spec, seed=seed))

    @functools.cached_property   # (a frozen dataclass without slots may cache: it writes __dict__ directly)
    def outputs(self) -> list[str]:
        return [o.name for o in self.train.get_outputs()]

    @functools.cached_property
    def data_shape(self) -> list:
        return input_shape(self.eval, self.contract.inputs.data)

    @property
    def fixed_batch(self) -> int | None:
        """The batch the model's data input is fixed at, or None for a dynamic batch axis."""
        return self.data_shape[0] if isinstance(self.data_shape[0], int) else None

    def load_data(self, data, where: str = "data"):
        """(x, y) of a .npz path, or of (x, y) given in memory, checked against the model's data inputs."""
        inputs = {n: (input_shape(self.eval, n), input_dtype(self.eval, n)) for n in self.contract.data_inputs}
        return read(data, inputs, class_count(self.eval), where, self.contract.head)

    def evaluate(self, tensors: Mapping[str, np.ndarray], x, y: np.ndarray, batch: int = 512) -> dict:
        """Scores of the eval graph at the state `tensors` on loaded (x, y) (runtime/metrics.py)."""
        with running(self.where["eval"]):
            return score(self.eval, self.contract.inputs.data, x, y, tensors, batch, self.contract.head,
                         probabilities=self.probabilities)


def open_train_graph(out: pathlib.Path):
    """(model, validated contract, sha256 of the file) of OUT/train.onnx."""
    model = modelio.load_model(out / LAYOUT.train)
    return model, validate.parse_contract(model, out / LAYOUT.train), validate.file_sha256(out / LAYOUT.train)


def scores_arithmetic(contract) -> bool:
    """Whether eval scores the model's own ONNX arithmetic (fgcompile.session.ARITHMETIC_LEVEL): when the step
    computes it too (--forward exact); under --forward qdq eval runs the runtime's own kernels, as the step does."""
    return contract.spec.forward == "exact"


def session_of(model: onnx.ModelProto, path, threads: int = 0, session: SessionSettings | None = None,
               training: bool = False, arithmetic: bool = False):
    try:
        return make_session(model, threads, session, training=training, arithmetic=arithmetic)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:300]}). The file "
                         "was edited or damaged; recompile the model.") from None
