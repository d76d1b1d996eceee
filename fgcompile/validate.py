"""Checks that what a compiled folder holds agrees with itself before train, eval or export use it.

contract  the JSON in train.onnx: required keys and types, a valid spec, and names, dtypes and shapes
          that match the graph's own inputs and outputs (an edited contract cannot pass silently)
state     state.npz / checkpoint.npz arrays: exactly the contract's names, its dtypes and shapes, and
          values inside [qmin, qmax] (a checkpoint of another compile exports garbage otherwise)
source    source.onnx holds each trained tensor with source_dtype and the initial state is exactly it,
          or F times it where `widened` says so (F = `factor`, 256 before headroom; fgcompile/grid.py),
          except a preconditioned weight, which is re-quantized in the whitened basis
Every failure names the file, the problem and the fix.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fgcompile.artifact import METADATA_KEY, REQUIRED_KEYS, REQUIRED_STATE_KEYS, TRAIN_FORMAT, Contract
from fgcompile.errors import FgcompileError, ModelError, SpecError
from fgcompile.grid import WIDENED_QMAX, widen
from fgcompile.heads import HEADS

INT_DTYPES = ("int8", "uint8", "int16", "uint16", "int32")


class StateError(FgcompileError):
    """A state or checkpoint file does not belong to this compiled folder's graph."""


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def contract_problem(contract, model: onnx.ModelProto) -> str | None:
    """What is wrong with `contract` as the contract of `model`, or None."""
    if not isinstance(contract, dict):
        return "not a JSON object"
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(contract.get(key), kind):
            return f"missing or malformed key {key!r}"
    graph_in = {i.name: i.type.tensor_type for i in model.graph.input}
    graph_out = {o.name for o in model.graph.output}
    for role in {"data", "labels", "seed", "lr", *contract["inputs"]}:
        if contract["inputs"].get(role) not in graph_in:
            return f"inputs.{role} = {contract['inputs'].get(role)!r} is not an input of the graph"
    for key in ("default", "shift", "max"):
        value = contract["lr_numerator"].get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            return f"lr_numerator.{key} is missing or not an integer"
    if contract.get("head", "softmax") not in HEADS:
        return f"head {contract['head']!r} is none of {', '.join(HEADS)}"
    if not contract["state"]:
        return "the state list is empty"
    for s in contract["state"]:
        if not isinstance(s, dict):
            return "a state entry is not an object"
        for field, kind in REQUIRED_STATE_KEYS.items():
            if not isinstance(s.get(field), kind) or (kind is int and isinstance(s.get(field), bool)):
                return f"state entry {s.get('name')!r}: field {field!r} is missing or not a {kind.__name__}"
        name, dtype = s["name"], s["dtype"]
        if dtype not in INT_DTYPES or s["source_dtype"] not in INT_DTYPES:
            return f"state {name!r}: dtype {dtype!r} / source_dtype {s['source_dtype']!r} is not an integer grid"
        if name not in graph_in or s["output"] not in graph_out:
            return f"state {name!r}: the graph has no input {name!r} or no output {s['output']!r}"
        t = graph_in[name]
        if helper.tensor_dtype_to_np_dtype(t.elem_type).name != dtype:
            return (f"state {name!r}: dtype {dtype} but the graph input is "
                    f"{helper.tensor_dtype_to_np_dtype(t.elem_type).name}")
        if [d.dim_value for d in t.shape.dim] != s["shape"]:
            return f"state {name!r}: shape {s['shape']} but the graph input is {[d.dim_value for d in t.shape.dim]}"
        info = np.iinfo(dtype)
        if not info.min <= s["qmin"] < s["qmax"] <= info.max:
            return f"state {name!r}: [qmin, qmax] = [{s['qmin']}, {s['qmax']}] does not fit {dtype}"
        if s["widened"]:
            qmax = WIDENED_QMAX.get((s["source_dtype"], dtype))
            if qmax is None or s["qmax"] > qmax:
                return f"state {name!r}: widened from {s['source_dtype']} to {dtype} is not a widening fgcompile makes"
        elif dtype != s["source_dtype"]:
            return f"state {name!r}: dtype {dtype} differs from source_dtype {s['source_dtype']} but widened is false"
    try:
        from fgcompile.spec import TrainSpec
        TrainSpec(**contract["spec"])
    except SpecError as exc:
        return f"its spec is invalid ({exc})"
    except TypeError as exc:
        return f"its spec has unknown or missing options ({exc})"
    return None


def parse_contract(model: onnx.ModelProto, path) -> Contract:
    """The validated contract of the training graph at PATH (ModelError if missing, bad JSON or edited)."""
    props = {p.key: p.value for p in model.metadata_props}
    fix = f"Recompile the model into this folder (fgcompile compile MODEL.onnx -o {pathlib.Path(path).parent} --force)."
    if METADATA_KEY not in props:
        raise ModelError(f"{path}: this ONNX file has no fgcompile contract in its metadata; pass the folder "
                         "written by `fgcompile compile`.")
    try:
        contract = json.loads(props[METADATA_KEY])
    except ValueError as exc:
        raise ModelError(f"{path}: the fgcompile contract in its metadata is not valid JSON ({exc}). {fix}") from None
    written = contract.get("format") if isinstance(contract, dict) else None
    if isinstance(written, str) and written.startswith("fgcompile-train/") and written != TRAIN_FORMAT:
        raise ModelError(f"{path}: compiled by another fgcompile version (contract {written}; this one reads "
                         f"{TRAIN_FORMAT}). {fix}")
    problem = contract_problem(contract, model)
    if not problem:
        try:
            return Contract.from_dict(contract)
        except (TypeError, KeyError, ValueError, AttributeError) as exc:   # keys the checks above do not cover
            problem = f"malformed ({type(exc).__name__}: {exc})"
    raise ModelError(f"{path}: the fgcompile contract in its metadata is inconsistent with the graph: "
                     f"{problem}. The file was edited or damaged. {fix}")


def check_state(arrays: dict, contract: Contract, path, fix: str) -> dict:
    """`arrays` in the contract's order, if they are exactly the contract's state; else StateError."""
    want = {s.name: s for s in contract.state}
    missing, extra = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
    if missing or extra:
        raise StateError(f"{path}: does not hold this compiled graph's state (missing {missing or 'none'}, "
                         f"unexpected {extra or 'none'}); it belongs to another compile. {fix}")
    out = {}
    for name, s in want.items():
        a = arrays[name]
        if a.dtype.name != s.dtype or list(a.shape) != s.shape:
            raise StateError(f"{path}: {name!r} is {a.dtype.name} {list(a.shape)} but the graph trains "
                             f"{s.dtype} {s.shape}; the file belongs to another compile. {fix}")
        if a.size and (a.min() < s.qmin or a.max() > s.qmax):
            raise StateError(f"{path}: {name!r} holds values in [{a.min()}, {a.max()}], outside its grid "
                             f"[{s.qmin}, {s.qmax}]; the file is corrupt or from another compile. {fix}")
        out[name] = a
    return out


def check_source(source: onnx.ModelProto, initial: dict, contract: Contract, path) -> dict:
    """The source initializers of the trained tensors, checked against the contract and the initial state."""
    inits = {i.name: i for i in source.graph.initializer}
    preconditioned = {p.weight for p in contract.precondition}
    for s in contract.parameters():
        name = s.name
        fix = "The folder was edited or mixed with another compile; recompile the model."
        if name not in inits:
            raise ModelError(f"{path}: has no initializer {name!r} that the contract trains. {fix}")
        src = numpy_helper.to_array(inits[name])
        expect = widen(src, s.factor if s.widened else 1)
        if src.dtype.name != s.source_dtype or list(src.shape) != s.shape \
                or name not in preconditioned and not np.array_equal(initial[name].astype(np.int64), expect):
            raise ModelError(f"{path}: {name!r} ({src.dtype.name} {list(src.shape)}) does not match the contract "
                             f"(source_dtype {s.source_dtype}, widened {s.widened}) and the initial state. {fix}")
    return inits
