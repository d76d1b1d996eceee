"""Writes a run folder for fgc_train (fgc_train.c): a compiled folder's initial state and the batches of
its first STEPS training steps, as raw little-endian C-ordered files beside a text manifest.

    python export_run.py OUT DATA.npz RUN_DIR --steps 20 [--batch 32]

The batches are the ones `fgcompile train OUT --data DATA.npz --batch B` feeds at steps 0 .. STEPS-1:
epoch e's batches are consecutive slices of numpy.random.default_rng([seed, e]).permutation(n), n // B
of them per epoch, with seed the contract's spec.seed. Needs numpy and onnx only, not fgcompile: the
contract is read from train.onnx's metadata_props["fgcompile"] (format fgcompile-train/2).
"""
import argparse
import json
import os
import pathlib
import sys

import numpy as np
import onnx

FORMAT = "fgc-c-run/1"
CONTRACT = "fgcompile-train/2"


def fail(message: str):
    sys.exit(f"export_run.py: error: {message}")


def contract_of(out: pathlib.Path) -> tuple[dict, dict]:
    """(contract, {graph input name: numpy dtype}) of OUT/train.onnx."""
    path = out / "train.onnx"
    if not path.is_file():
        fail(f"{path}: no such file. Compile the model first: fgcompile compile MODEL.onnx -o {out}")
    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "fgcompile" not in meta:
        fail(f"{path}: has no metadata_props['fgcompile']; it is not a train.onnx written by fgcompile compile.")
    contract = json.loads(meta["fgcompile"])
    if contract.get("format") != CONTRACT:
        fail(f"{path}: its contract is {contract.get('format')!r}, not {CONTRACT}. Recompile the model.")
    dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    return contract, dtypes


def read_data(path: pathlib.Path, dtype) -> tuple[np.ndarray, np.ndarray]:
    """x (decoded as fgcompile decodes x_scale/x_offset codes) and y of a data .npz."""
    try:
        with np.load(path) as d:
            arrays = {k: d[k] for k in d.files}
    except (OSError, ValueError) as exc:
        fail(f"{path}: cannot read it as .npz ({exc}). Save it with numpy.savez(path, x=..., y=...).")
    if "x" not in arrays or "y" not in arrays:
        fail(f"{path}: needs arrays x and y (holds {sorted(arrays)}).")
    x, y = arrays["x"], arrays["y"]
    if "x_scale" in arrays or "x_offset" in arrays:
        scale, offset = arrays.get("x_scale", np.float32(1)), arrays.get("x_offset", np.float32(0))
        x = (np.float32(offset) + np.float32(scale) * x.astype(np.float32)).astype(np.float32)
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        fail(f"{path}: y must hold one integer class index per example of x.")
    return x.astype(dtype), y.astype(np.int64)


def line(role: str, name: str, dtype, file: str, shape) -> str:
    if any(c.isspace() for c in name):
        fail(f"tensor name {name!r} holds whitespace, which the manifest cannot carry.")
    return " ".join([role, name, np.dtype(dtype).name, file, str(len(shape)), *map(str, shape)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=pathlib.Path, help="the compiled folder (fgcompile compile ... -o OUT)")
    p.add_argument("data", type=pathlib.Path, help="the training data, .npz with x and y")
    p.add_argument("run_dir", type=pathlib.Path, help="the folder to write (must not exist)")
    p.add_argument("--steps", type=int, required=True, help="how many steps' batches to write")
    p.add_argument("--batch", type=int, default=32, help="examples per batch (fgcompile train's --batch)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch < 1:
        fail("--steps and --batch must be at least 1.")
    if a.run_dir.exists():
        fail(f"{a.run_dir}: exists; export_run.py writes a new folder. Pass another RUN_DIR or move it away.")
    contract, dtypes = contract_of(a.out)
    if len(contract["data_inputs"]) != 1 or contract.get("head", "softmax") != "softmax":
        fail("this example feeds one data input and int64 class labels; the model has "
             f"{len(contract['data_inputs'])} data inputs and a {contract.get('head')} head.")
    data_name, io = contract["data_inputs"][0], contract["inputs"]
    x, y = read_data(a.data, dtypes[data_name])
    batch = min(a.batch, len(y))
    per_epoch, seed = len(y) // batch, contract["spec"]["seed"]
    order = [np.random.default_rng([seed, e]).permutation(len(y)) for e in range(-(-a.steps // per_epoch))]
    idx = np.concatenate([order[k // per_epoch][(k % per_epoch) * batch:][:batch] for k in range(a.steps)])
    with np.load(a.out / "state.npz") as saved:
        state = {s["name"]: saved[s["name"]] for s in contract["state"]}

    tmp = a.run_dir.with_name(a.run_dir.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    lines = [f"format {FORMAT}", f"batches {a.steps}",
             line("data", data_name, x.dtype, "x.bin", (batch, *x.shape[1:])),
             line("labels", io["labels"], np.int64, "labels.bin", (batch,))]
    np.ascontiguousarray(x[idx]).astype(x.dtype.newbyteorder("<")).tofile(tmp / "x.bin")
    y[idx].astype("<i8").tofile(tmp / "labels.bin")
    for i, (name, value) in enumerate(state.items()):
        lines.append(line("state", name, value.dtype, f"state_{i}.bin", value.shape))
        np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tofile(tmp / f"state_{i}.bin")
    (tmp / "manifest.txt").write_text("\n".join(lines) + "\n")
    os.rename(tmp, a.run_dir)
    print(f"wrote {a.run_dir}: {a.steps} batches of {batch}, {len(state)} state tensors (seed {seed}, "
          f"lr numerator {contract['lr_numerator']['default']})")


if __name__ == "__main__":
    main()
