"""onnxruntime's 8-bit integer products on this CPU: exact or not, and how fast, per operand form.

    python benchmarks/integer_kernels.py [--m 4096 --k 576 --n 256]

One MatMulInteger [M, K]·[K, N] with a constant weight, one thread, the median of 7 calls, against the int64
product: uint8 × int8 as quantizers write it, and the forms that avoid the uint8 × int8 kernel (which on x86
without AVX-VNNI adds byte-product pairs in saturating int16): the weight as uint8 w + 128 with zero point 128
(what graph_ops.Builder.integer_product builds), with the correction as a second product, as two int8 planes
of at most ±64, and int8 × int8. Prints a markdown table (benchmarks/README.md, "Exact integer products on
every CPU").
"""
from __future__ import annotations

import time

import click
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

INT32 = np.int32


def _timed(nodes, inits, a, want) -> tuple[int, float]:
    """(max |error|, ms) of the graph that maps input a to y."""
    dtype = TensorProto.UINT8 if a.dtype == np.uint8 else TensorProto.INT8
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", dtype, list(a.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"a": a})[0]
    times = []
    for _ in range(7):
        t = time.perf_counter()
        sess.run(None, {"a": a})
        times.append(time.perf_counter() - t)
    return int(np.abs(y.astype(np.int64) - want).max()), 1000 * float(np.median(times))


def rows(m: int, k: int, n: int) -> list[tuple[str, int, float]]:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    want = a.astype(np.int64) @ w.astype(np.int64)
    const = numpy_helper.from_array
    mmi = lambda ins, out="y": helper.make_node("MatMulInteger", ins, [out])
    unsigned = (w.astype(INT32) + 128).astype(np.uint8)
    hi = np.floor_divide(w.astype(INT32) + 32, 64).astype(np.int8)
    lo = (w.astype(INT32) - 64 * hi).astype(np.int8)
    signed_a = (a.astype(INT32) - 128).astype(np.int8)     # a − 128 with zero point −128: the same values
    forms = {
        "uint8 × int8 (as quantizers write it)": ([mmi(["a", "w"])], [const(w, "w")], a),
        "uint8 × (int8 + 128), zero point 128 (kept)": (
            [mmi(["a", "w", "", "zw"])], [const(unsigned, "w"), const(np.array(128, np.uint8), "zw")], a),
        "uint8 × (int8 + 128), 128·Σa by a second product": (
            [mmi(["a", "w"], "p"), mmi(["a", "ones"], "s"), helper.make_node("Mul", ["s", "k"], ["c"]),
             helper.make_node("Sub", ["p", "c"], ["y"])],
            [const(unsigned, "w"), const(np.ones((k, 1), np.uint8), "ones"), const(np.array(128, INT32), "k")], a),
        "uint8 × two int8 planes of ±64": (
            [mmi(["a", "hi"], "h"), mmi(["a", "lo"], "l"), helper.make_node("Mul", ["h", "k"], ["h64"]),
             helper.make_node("Add", ["h64", "l"], ["y"])],
            [const(hi, "hi"), const(lo, "lo"), const(np.array(64, INT32), "k")], a),
        "int8 × int8": ([mmi(["a", "w", "za"])], [const(w, "w"), const(np.array(-128, np.int8), "za")], signed_a),
    }
    return [(name, *_timed(nodes, inits, x, want)) for name, (nodes, inits, x) in forms.items()]


@click.command()
@click.option("--m", default=4096)
@click.option("--k", default=576)
@click.option("--n", default=256)
def main(m, k, n):
    print(f"MatMulInteger [{m}, {k}]·[{k}, {n}], constant weight, one thread, onnxruntime {ort.__version__}\n")
    print("| operands | max error against int64 | ms |\n|---|---|---|")
    for name, error, ms in rows(m, k, n):
        print(f"| {name} | {error:,} | {ms:.1f} |")


if __name__ == "__main__":
    main()
