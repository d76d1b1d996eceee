"""fgcompile.models: the shipped quantized models and data (see manifest.json and README.md here)."""
import json
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent


def manifest() -> dict:
    return json.loads((ROOT / "manifest.json").read_text())


def path(relative: str) -> pathlib.Path:
    """Absolute path of a shipped file named as in the manifest (e.g. 'digits_cnn/w8a8.onnx')."""
    return ROOT / relative


def keyword_vs_rest(y: np.ndarray, keyword: int) -> np.ndarray:
    """A detector's 0/1 labels from class labels y [n]: 1 where y is the class `keyword`, 0 for every other.
    The invariant its test checks: the positives are exactly y == keyword, and nothing else changes."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"keyword_vs_rest: y must be integer class labels [n], not {y.dtype} {list(y.shape)}")
    return (y == keyword).astype(np.int64)


def split(name: str, which: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of a shipped model's data split (e.g. 'target_train') in the labels the model predicts: its
    `splits` files (else the manifest's `data`), relabelled keyword-vs-rest when its entry names a
    `keyword` (kws_detect reads kws_dscnn's ten-word files: the keyword is one class, the rest is 0)."""
    from fgcompile.runtime.data import load_data   # the package imports this module; load lazily
    man = manifest()
    entry = man["models"][name]
    x, y = load_data(path(entry.get("splits", man["data"])[which]))
    if "keyword" in entry:
        y = keyword_vs_rest(y, entry["keyword"]["class"])
    return x, y
