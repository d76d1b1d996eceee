"""Build the TFLite-origin int8 test models: small keras models quantized by tensorflow's full-integer
converter and converted to ONNX QDQ by tf2onnx, as a deployment team receives them.

Recipe-only: tensorflow and tf2onnx live in their own virtualenv and are never package dependencies.
Run from the repository root (~1 min on one core):

    python3.11 -m venv /tmp/tf
    /tmp/tf/bin/pip install 'tensorflow-cpu==2.21.*' 'tf2onnx==1.17.*' 'onnxruntime==1.32.*'
    /tmp/tf/bin/python models/recipes/build_tflite.py

Models (keras, NHWC inside; each takes the shipped NCHW data through a Permute, a TFLite TRANSPOSE, which
tf2onnx folds into its own layout transposes; a TRANSPOSE back to NHWC stays before the Flatten or the mean):
- tflite/digits_int8.onnx: Permute, Conv 3x3 (16), DepthwiseConv 3x3 stride 2, Conv 1x1 (32), Flatten
  (a TFLite RESHAPE), Dense(10), Softmax; on the digits splits (labels 0..9).
- tflite/kws_detect_int8.onnx: a keyword-vs-rest DS-CNN detector with one sigmoid output [batch, 1]:
  Permute, Conv 9x3 stride 2 (32), 3 x [DepthwiseConv 3x3 (the first strided), Conv 1x1], BatchNorm
  folded, global mean, Dense(1), Sigmoid; on the speech splits with label 1 for KEYWORD, 0 for the
  other nine words (kws_model.py's noise augmentation; 20 epochs).

Conversion: TFLiteConverter with Optimize.DEFAULT, a representative dataset of 200 train inputs (the
detector: 200 clean and 200 noise-augmented clips),
TFLITE_BUILTINS_INT8 and float32 input/output types, so every activation is int8 (TFLite's asymmetric
int8: zero points such as -128) and every weight int8 (per-channel for convolutions). tf2onnx's default
(no --dequantize) keeps TFLite's quantization as QuantizeLinear/DequantizeLinear pairs: int8 weight
initializers through DequantizeLinear, int32 biases, and Transpose/Reshape moving int8 tensors between a
QuantizeLinear and a DequantizeLinear (TFLite runs them on int8 data). tf2onnx 1.17
writes opset 18 at most; onnx's version converter lifts the result to opset 21 (the Q/DQ ops' semantics
do not change for per-tensor and per-axis quantization).

manifest.json's `tflite` section records the sizes and the accuracies (and the detector's ROC AUC) that
onnxruntime measures, next to the TFLite interpreter's on the same inputs. A rerun on one machine trains
the same weights (seeded, op determinism on) but tf2onnx numbers its generated names (scale__N,
zero_point__N) differently from run to run, so the files' bytes differ.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
from onnx import version_converter  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tflite"
OPSET = 21
TF2ONNX_OPSET = 18     # the highest tf2onnx 1.17 knows
SEED = 0
# kws_data.py's constants, copied: that module needs scipy
KEYWORD, WORD = 0, "yes"   # the detector's positive class (WORDS[0])
DB_LO, DB_HI, MELS = -100.0, 0.0, 40
SPLITS = ("source_train", "source_test", "target_train", "target_test")


def load(rel: str) -> tuple[np.ndarray, np.ndarray]:
    """x float32 as fgcompile's loader returns it (uint8 codes times x_scale) and y int64."""
    d = np.load(ROOT / rel)
    x = d["x"].astype(np.float32)
    if "x_scale" in d.files:
        x = np.float32(d["x_scale"]) * x
    return x, d["y"].astype(np.int64)


def add_noise(x: np.ndarray, rng: np.random.Generator, p: float = 0.8) -> np.ndarray:
    """kws_model.add_noise in numpy: a flat noise floor 10-40 dB below each clip's mean band power, mixed
    in the power domain into a share p of the clips. Without it a first version of the detector scored
    every target clip below 2/256: it read the device's noise floor as "not the keyword"."""
    power = 10 ** ((x * (DB_HI - DB_LO) + DB_LO) / 10)
    level = power.sum(2, keepdims=True).mean(3, keepdims=True) / MELS
    snr = 10 + 30 * rng.random((len(x), 1, 1, 1))
    cells = -np.log(np.maximum(rng.random(x.shape), 1e-6))
    mixed = np.clip((10 * np.log10(power + level * 10 ** (-snr / 10) * cells) - DB_LO) / (DB_HI - DB_LO), 0, 1)
    return np.where(rng.random((len(x), 1, 1, 1)) >= p, x, mixed).astype(np.float32)


def digits_model() -> tf.keras.Model:
    L = tf.keras.layers
    return tf.keras.Sequential([
        L.Input((1, 8, 8)), L.Permute((2, 3, 1)),
        L.Conv2D(16, 3, padding="same", activation="relu"),
        L.DepthwiseConv2D(3, strides=2, padding="same", activation="relu"),
        L.Conv2D(32, 1, activation="relu"),
        L.Flatten(), L.Dense(10), L.Softmax()])


def detector_model(c: int = 32) -> tf.keras.Model:
    L = tf.keras.layers
    layers = [L.Input((1, 40, 49)), L.Permute((2, 3, 1)),
              L.Conv2D(c, (9, 3), strides=2, padding="same", use_bias=False), L.BatchNormalization(), L.ReLU()]
    for i in range(3):
        layers += [L.DepthwiseConv2D(3, strides=2 if i == 0 else 1, padding="same", use_bias=False),
                   L.BatchNormalization(), L.ReLU(),
                   L.Conv2D(c, 1, use_bias=False), L.BatchNormalization(), L.ReLU()]
    layers += [L.GlobalAveragePooling2D(), L.Dense(1, activation="sigmoid")]
    return tf.keras.Sequential(layers)


def to_tflite(model: tf.keras.Model, calib: np.ndarray) -> bytes:
    """Full-integer int8: int8 weights and activations, float32 in and out (QUANTIZE/DEQUANTIZE at the ends)."""
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([calib[i:i + 1]] for i in range(len(calib)))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.float32
    conv.inference_output_type = tf.float32
    return conv.convert()


def to_onnx(tflite: bytes, out: pathlib.Path, output_name: str) -> None:
    """tf2onnx keeps the quantization as Q/DQ (no --dequantize); then lift to OPSET. The input is renamed
    `x` as in the shipped models, the output `output_name`."""
    inp, outp = tflite_io(tflite)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = pathlib.Path(tmp) / "model.tflite", pathlib.Path(tmp) / "model.onnx"
        src.write_bytes(tflite)
        subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--tflite", str(src), "--output", str(dst),
                        "--opset", str(TF2ONNX_OPSET), "--inputs", inp, "--rename-inputs", "x",
                        "--outputs", outp, "--rename-outputs", output_name], check=True, capture_output=True)
        m = onnx.load(dst)
    m = version_converter.convert_version(m, OPSET)
    for value in (m.graph.input[0], m.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, out)


def tflite_io(tflite: bytes) -> tuple[str, str]:
    it = tf.lite.Interpreter(model_content=tflite)
    return it.get_input_details()[0]["name"], it.get_output_details()[0]["name"]


def tflite_run(tflite: bytes, x: np.ndarray) -> np.ndarray:
    it = tf.lite.Interpreter(model_content=tflite)
    i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    it.resize_tensor_input(i, [len(x), *x.shape[1:]])
    it.allocate_tensors()
    it.set_tensor(i, x)
    it.invoke()
    return it.get_tensor(o)


def onnx_run(path: pathlib.Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def roc_auc(score: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney: the chance a positive outscores a negative (ties count half)."""
    pos, neg = score[y == 1], score[y == 0]
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


def scores(out: np.ndarray, y: np.ndarray, detector: bool) -> dict:
    if not detector:
        return {"accuracy": float((out.argmax(1) == y).mean())}
    p = out[:, 0]
    return {"accuracy": float(((p >= 0.5) == y).mean()), "auc": roc_auc(p, y)}


def build(name: str, make_model, data: dict, detector: bool, epochs: int, output_name: str) -> dict:
    tf.keras.utils.set_random_seed(SEED)   # each model's run does not depend on the ones before it
    model = make_model()
    (x, y) = data["source_train"]
    if detector:
        # no class weights: at the data's 10% keyword prior, p >= 0.5 stays a sensible threshold
        model.compile(tf.keras.optimizers.Adam(2e-3), "binary_crossentropy")
        rng = np.random.default_rng(SEED)
        for _ in range(epochs):   # fresh noise each epoch
            model.fit(add_noise(x, rng), y.astype(np.float32), batch_size=64, epochs=1, verbose=0)
    else:
        model.compile(tf.keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    rng = np.random.default_rng(SEED)
    calib = x[rng.permutation(len(x))[:200]]
    if detector:   # as kws_model.py calibrates: 200 clean and 200 noise-augmented clips
        calib = np.concatenate([calib, add_noise(x[rng.permutation(len(x))[:200]], rng, p=1.0)])
    for split in ("source_test", "target_test"):
        print(name, split, "keras float", scores(model.predict(data[split][0], verbose=0), data[split][1], detector))
    tflite = to_tflite(model, calib)
    path = OUT / f"{name}.onnx"
    to_onnx(tflite, path, output_name)
    entry = {"file": f"tflite/{name}.onnx", "bytes": path.stat().st_size}
    for split in ("source_test", "target_test"):
        xs, ys = data[split]
        mine, ref = scores(onnx_run(path, xs), ys, detector), scores(tflite_run(tflite, xs), ys, detector)
        entry.update({f"{split}_{k}": v for k, v in mine.items()})
        entry.update({f"{split}_tflite_{k}": v for k, v in ref.items()})
    return entry


def main():
    tf.config.experimental.enable_op_determinism()
    man_path = ROOT / "manifest.json"
    man = json.loads(man_path.read_text())
    OUT.mkdir(exist_ok=True)
    digits = {s: load(man["data"][s]) for s in SPLITS}
    kws_splits = man["models"]["kws_dscnn"]["splits"]
    kws = {s: (x, (y == KEYWORD).astype(np.int64)) for s, (x, y) in ((s, load(kws_splits[s])) for s in SPLITS)}
    section = {
        "digits_int8": {"source": "models/recipes/build_tflite.py", "data": man["data"], "labels": "classes 0..9",
                        "output": "probabilities", **build("digits_int8", digits_model, digits, False, 30, "probs")},
        "kws_detect_int8": {"source": "models/recipes/build_tflite.py", "data": kws_splits,
                            "labels": f"1 where y == {KEYWORD} ('{WORD}'), else 0", "keyword": KEYWORD,
                            "output": "sigmoid", **build("kws_detect_int8", detector_model, kws, True, 20, "prob")},
    }
    man["tflite"] = {"versions": {"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__}, "models": section}
    man_path.write_text(json.dumps(man, indent=2) + "\n")
    print(json.dumps(man["tflite"], indent=2))


if __name__ == "__main__":
    main()
