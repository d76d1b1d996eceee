"""Diagnosis of an accuracy gap: QZO-FF's target test accuracy at every learning rate of a list (3 seeds;
--seeds to change).

    python benchmarks/lr_curve.py --model digits_attn --epochs 30 --m 32 --lrs 4,8,16,32,64,128
    python benchmarks/lr_curve.py --epochs 30 --lrs 8,16,32 --eps 64            # another ε
    python benchmarks/lr_curve.py --epochs 30 --lrs 8,16,32 --bias-range 4      # the Add bias on a 4x range

The benchmark (run.py) chooses the rate on a validation split; this script scores every rate on the test
split, so it says whether a gap comes from the rate choice or from the method at its best rate. It is a
diagnosis: never use it to choose a rate. --bias-range R re-quantizes the shipped model's 8-bit Add bias
(digits_attn's classifier bias, uint8 asymmetric, which trains without headroom) on an R x wider range
centred on the pretrained one, as headroom would, in a copy of the model.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

import click
import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import accuracy  # noqa: E402
from fgcompile import models, modelio  # noqa: E402
from fgcompile.spec import TrainSpec  # noqa: E402


def load(split: str):
    d = np.load(models.path(models.manifest()["data"][split]))
    return d["x"], d["y"]


def wider_add_bias(model: onnx.ModelProto, ratio: int) -> onnx.ModelProto:
    """A copy whose uint8 Add biases sit on `ratio` x their scale, zero point re-centred (values rounded)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or len(n.input) < 3 or not n.input[0].endswith("bias_quantized"):
            continue
        q = numpy_helper.to_array(inits[n.input[0]])
        if q.dtype != np.uint8:
            continue
        s, zp = float(numpy_helper.to_array(inits[n.input[1]])), int(numpy_helper.to_array(inits[n.input[2]]))
        b = s * (q.astype(np.int64) - zp)
        zp2 = int(round(127.5 - (127.5 - zp) / ratio))
        inits[n.input[0]].CopyFrom(numpy_helper.from_array(
            np.clip(np.round(b / (ratio * s)) + zp2, 0, 255).astype(np.uint8), n.input[0]))
        inits[n.input[1]].CopyFrom(numpy_helper.from_array(np.array(ratio * s, np.float32), n.input[1]))
        inits[n.input[2]].CopyFrom(numpy_helper.from_array(np.array(zp2, np.uint8), n.input[2]))
    return model


@click.command()
@click.option("--model", default="digits_attn", show_default=True)
@click.option("--variant", type=click.Choice(["w16a8", "w8a8"]), default="w16a8", show_default=True)
@click.option("--epochs", default=30, show_default=True)
@click.option("--m", default=TrainSpec.m, show_default=True)
@click.option("--eps", type=int, default=None, help="ε in LSBs [the grid's default].")
@click.option("--batch", default=32, show_default=True)
@click.option("--schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True)
@click.option("--lrs", default="4,8,16,32,64", show_default=True, help="Comma-separated rates.")
@click.option("--options", default="{}", help='Other TrainSpec fields as JSON, e.g. \'{"estimator": "spsa"}\'.')
@click.option("--bias-range", type=int, default=1, show_default=True)
@click.option("--seeds", "seed_list", default="0,1,2", show_default=True, help="Comma-separated seeds.")
def main(model, variant, epochs, m, eps, batch, schedule, lrs, options, bias_range, seed_list):
    from run import parse_seeds
    seeds = parse_seeds(seed_list)
    train, test = load("target_train"), load("target_test")
    source = modelio.load_model(models.path(models.manifest()["models"][model]["variants"][variant]["file"]))
    if bias_range > 1:
        source = wider_add_bias(source, bias_range)
    bits = 8 if variant == "w8a8" else 16
    for lr in (float(x) for x in lrs.split(",")):
        t0 = time.perf_counter()
        runs = [accuracy.qzo_ff(source, TrainSpec(m=m, bits=bits, lr=lr, seed=s, eps=eps, **json.loads(options)),
                                train, test, epochs, batch, schedule) for s in seeds]
        print(f"{model} {variant} {epochs} epochs m={m} eps={eps} batch={batch} {schedule} {options} "
              f"bias-range={bias_range} lr {lr:g}: test {np.mean(runs):.2%} {[round(r, 4) for r in runs]} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
