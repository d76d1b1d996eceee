"""export: write the trained integer weights back into the original inference graph.

A weight trained on its source grid is written as it is. A weight trained on another grid (widened,
with headroom, or preconditioned) goes back to the deployed grid (fgcompile/grid.py):

    W = DQ(W_t)                       on the training grid: W_t · s_t
    W = P · W                         preconditioned sites: fold the whitening back (K×N orientation)
    s_d = max(s, max|W| / qmax) per channel,  W_d = round_half_away(W / s_d)   in the source dtype
and the site's int32 bias (s_b = s_in · s_w) follows the new scale. Without headroom or preconditioning
s_d = s and W_d = round_half_away(W_t / F): plain narrowing. The exported model has the same nodes, ops
and dtypes as the input model; the report says what the rounding and any refit scale cost.
"""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import onnx
from onnx import numpy_helper

from fgcompile import __version__, folder, modelio, validate
from fgcompile.artifact import LAYOUT, Contract, StateTensor, Whitening
from fgcompile.errors import ModelError, OutputError
from fgcompile.grid import deployed_scale, narrow, requantize, round_half_away
from . import checkpoint
from .program import open_train_graph, session_of
from .sink import latest_state


def _array(inits: dict, name: str) -> np.ndarray:
    """An initializer the export reads (a scale or zero point); a folder whose source lacks it was edited."""
    if name not in inits:
        raise ModelError(f"source.onnx has no initializer {name!r} for a trained tensor's quantization; the "
                         "folder was edited or damaged. Recompile the model.")
    return numpy_helper.to_array(inits[name])


def _dq_of(model, name: str):
    dq = next((n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == name), None)
    if dq is None:
        raise ModelError(f"source.onnx has no DequantizeLinear reading {name!r}; the folder was edited or "
                         "damaged. Recompile the model.")
    return dq


def _fold(w: np.ndarray, pre: Whitening, matrices: dict) -> np.ndarray:
    p = matrices[pre.matrix].astype(np.float64)
    return p @ w if pre.layout == "kn" else (p @ w.T).T


def _narrowed(s: StateTensor, value: np.ndarray) -> tuple[np.ndarray, dict]:
    """(W, report) of a tensor widened by an integer F and narrowed back in integers."""
    q = narrow(value, s.source_dtype, int(s.factor))
    err = value.astype(np.int64) - q.astype(np.int64) * int(s.factor)
    return q, {"narrowed": f"{s.dtype}->{s.source_dtype}", "inexact_fraction": float((err != 0).mean())}


def _weight(model, inits, s: StateTensor, value, pre: Whitening | None, matrices) -> tuple[np.ndarray, np.ndarray, dict]:
    """(W_d, s_d / s per channel, report) of one trained weight on a changed grid."""
    dq = _dq_of(model, s.name)
    scale = _array(inits, dq.input[1]).astype(np.float32)
    if len(dq.input) > 2 and dq.input[2] and np.any(_array(inits, dq.input[2]) != 0):
        q, report = _narrowed(s, value)   # asymmetric weights are widened only (zp_t = F·zp): narrow back
        return q, np.ones(scale.size), report
    axis = s.axis if scale.size > 1 else None
    s_t = np.asarray(pre.scale, np.float32).reshape(scale.shape) if pre else scale / np.float32(s.factor)
    shape = [1] * value.ndim
    if axis is not None:
        shape[axis] = -1
    w = value.astype(np.float64) * s_t.astype(np.float64).reshape(shape if axis is not None else ())
    if pre:
        w = _fold(w, pre, matrices)
    qmax = int(np.iinfo(s.source_dtype).max)
    s_d = deployed_scale(w, scale, axis, s.source_dtype)
    q = requantize(w, s_d, axis, s.source_dtype)
    if not pre and np.array_equal(s_d, scale) and s.factor >= 1:   # integer narrowing, bit-exact with the README formula
        q = narrow(value, s.source_dtype, int(s.factor))
    if not np.array_equal(s_d, scale):
        name = f"{dq.input[1]}__deployed"
        model.graph.initializer.append(numpy_helper.from_array(s_d, name))
        dq.input[1] = name
    beyond = np.abs(w) / (scale.astype(np.float64).reshape(shape if axis is not None else ())) >= qmax + 0.5
    rounding = np.abs(w / s_d.astype(np.float64).reshape(shape if axis is not None else ()) - q)
    report = {"narrowed": f"{s.dtype}->{s.source_dtype}",
              "preconditioned": bool(pre), "inexact_fraction": float((rounding > 1e-9).mean()),
              "mean_abs_rounding_lsb": float(rounding.mean()),
              "beyond_source_grid": float(beyond.mean()),
              "rescaled_channels": float((s_d != scale).mean())}
    return q, (s_d.astype(np.float64) / scale.astype(np.float64)).ravel(), report


def _bias_input(model, site: str) -> str | None:
    """The int32 initializer of a Conv/Gemm site's bias (its scale is tied to the weight's)."""
    node = next((n for n in model.graph.node if n.name == site), None)
    if node is None or node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
        return None
    dq = next((n for n in model.graph.node if n.output[0] == node.input[2] and n.op_type == "DequantizeLinear"), None)
    return dq.input[0] if dq is not None else None


def _bias(model, inits, name: str, value: np.ndarray, factor: float, ratio: np.ndarray) -> tuple[np.ndarray, float]:
    """(b_d, share of entries rounded): b_d = round_half_away(b_t / F / (s_d / s)), with the scale
    s_b · s_d / s written beside it."""
    dq = _dq_of(model, name)
    s_b = _array(inits, dq.input[1]).astype(np.float32)
    s_bd = (s_b.astype(np.float64) * ratio.reshape(s_b.shape) if s_b.size > 1 else s_b * ratio).astype(np.float32)
    b = value.astype(np.float64) / factor * (s_b.astype(np.float64) / s_bd.astype(np.float64))
    if not np.array_equal(s_bd, s_b):
        new = f"{dq.input[1]}__deployed"
        model.graph.initializer.append(numpy_helper.from_array(s_bd, new))
        dq.input[1] = new
    q = np.clip(round_half_away(b), -2 ** 31, 2 ** 31 - 1)
    return q.astype(np.int32), float((q != b).mean())


EXPORTED_KEY = "fgcompile-exported"   # the metadata_props entry by which export knows a model it wrote


def check_export_path(path, protected: dict, force: bool = False) -> None:
    """Raise OutputError unless PATH may be written: new, or a regular file that is a model fgcompile
    exported (or any regular file, with force); never one of the `protected` files {path: what it is}."""
    path = pathlib.Path(path)
    modelio.check_output_file(path, protected)
    if os.path.lexists(path) and not force and not is_exported(path):   # a dangling symlink too
        raise OutputError(f"{path}: exists and is not a model fgcompile exported; export replaces only its own "
                          "exports. Choose another -o path, or pass --force to replace the file.")


def is_exported(path) -> bool:
    try:
        if modelio.regular_file(path, "model") > modelio.PROTOBUF_LIMIT:
            return False
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # gone, special, or not ONNX at all (protobuf's DecodeError, or anything a random file raises)
        return False
    return any(p.key == EXPORTED_KEY for p in model.metadata_props)


def save_exported(model: onnx.ModelProto, path) -> None:
    """Write the exported model with the metadata entry that marks it as fgcompile's."""
    for p in [p for p in model.metadata_props if p.key == EXPORTED_KEY]:
        model.metadata_props.remove(p)
    model.metadata_props.add(key=EXPORTED_KEY, value=json.dumps({"fgcompile": __version__}))
    modelio.save_model(model, path)


def export_model(out_dir, path, force: bool = False) -> dict:
    """Write OUT's latest state into a copy of its source model at PATH. PATH must be new or a model
    fgcompile exported (any regular file with force), not a file of OUT and not the model OUT was
    compiled from."""
    out, path = pathlib.Path(out_dir), pathlib.Path(path)
    folder.recover(out)
    if not (out / LAYOUT.train).is_file() or not (out / LAYOUT.source).is_file():
        raise ModelError(f"{out}: not a compiled folder (needs {LAYOUT.train} and {LAYOUT.source}). Run "
                         "`fgcompile compile` first.")
    protected = {out: f"inside the compiled folder {out}"}
    if folder.marker(out).get("source"):
        protected[folder.marker(out)["source"]] = f"the model {out} was compiled from"
    check_export_path(path, protected, force)
    modelio.remove_stale_temps(path.parent)
    train, contract, train_sha256 = open_train_graph(out)
    model = modelio.load_model(out / LAYOUT.source)
    initial, _ = checkpoint.load(out / LAYOUT.state, contract, train_sha256)
    inits = validate.check_source(model, initial, contract, out / LAYOUT.source)
    report = write_state(model, inits, contract, latest_state(out, contract), matrices(train, contract),
                         out / LAYOUT.source)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{out / LAYOUT.source}: the exported model fails onnx.checker ({str(exc).splitlines()[0]}). "
                         "Recompile the model.") from None
    session_of(model, path)  # the exported file must load in stock onnxruntime
    save_exported(model, path)
    return report


def matrices(train: onnx.ModelProto, contract: Contract) -> dict:
    """The whitening matrices P the contract names, from the training graph's initializers (those of a
    Loop body too: with --branches loop a whitened site inside the trained suffix keeps P there)."""
    names = {p.matrix for p in contract.precondition}
    return {i.name: numpy_helper.to_array(i) for i in _initializers(train.graph) if i.name in names}


def _initializers(graph: onnx.GraphProto) -> list:
    found = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            found += [i for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs) for i in _initializers(g)]
    return found


def export_state(source: onnx.ModelProto, contract: Contract, state: dict,
                 whitening: dict | None = None) -> tuple[onnx.ModelProto, dict]:
    """In memory: a copy of the source model with `state` written in, and the rounding report.
    `whitening`: matrices(train, contract) when the contract preconditions a site."""
    model = onnx.ModelProto()
    model.CopyFrom(source)
    inits = {i.name: i for i in model.graph.initializer}
    missing = [s.name for s in contract.parameters() if s.name not in inits]
    if missing:
        raise ModelError(f"the source model has no initializer {missing[0]!r}: pass the model this training "
                         "graph was compiled from.")
    if contract.precondition and not whitening:
        raise ModelError("the contract whitens a trained layer: pass its whitening matrices "
                         "(export.matrices(train_model, contract)).")
    return model, write_state(model, inits, contract, state, whitening or {}, "the source model")


def write_state(model, inits: dict, contract: Contract, state: dict, matrices: dict, where) -> dict:
    """Write each trained tensor into its initializer, back on the deployed grid where widened or whitened."""
    pre = {p.weight: p for p in contract.precondition}
    report, ratios = {}, {}
    params = contract.parameters()
    for s in [s for s in params if s.role == "weight"] + [s for s in params if s.role != "weight"]:
        value = state[s.name]
        factor = s.factor if s.widened else 1
        if s.role == "weight" and (s.widened or s.name in pre):
            try:
                exported, ratios[s.site], report[s.name] = _weight(model, inits, s, value, pre.get(s.name), matrices)
            except (ValueError, IndexError, KeyError) as exc:   # shapes that disagree with the contract
                raise ModelError(f"{where}: {s.name!r} cannot be re-quantized ({exc}); the folder was "
                                 "edited or damaged. Recompile the model.") from None
        elif s.role == "bias" and (s.widened or s.site in ratios) and s.dtype == "int32" and s.float_grid is None:
            # (a float bias on its own grid, as torch fake-quant exports keep it, owes nothing to the weight's scale)
            exported, inexact = _bias(model, inits, s.name, value, factor, ratios.get(s.site, np.ones(1)))
            report[s.name] = {"narrowed": "int32->int32", "inexact_fraction": inexact}
        elif s.widened:   # an 8-bit Add bias or normalization scale: widened by 256 only
            exported, report[s.name] = _narrowed(s, value)
        else:
            exported = value.astype(s.source_dtype)
            report[s.name] = {"narrowed": None}
        inits[s.name].CopyFrom(numpy_helper.from_array(exported, s.name))
    trained = {s.name for s in params}
    for site, ratio in ratios.items():   # an untrained bias tied to a rescaled weight follows it
        name = _bias_input(model, site)
        if name is not None and name not in trained and not np.all(ratio == 1):
            inits[name].CopyFrom(numpy_helper.from_array(
                _bias(model, inits, name, numpy_helper.to_array(inits[name]), 1, ratio)[0], name))
    return report

