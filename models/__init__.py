"""fgcompile.models: the shipped quantized models and data (see manifest.json and README.md here)."""
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent


def manifest() -> dict:
    return json.loads((ROOT / "manifest.json").read_text())


def path(relative: str) -> pathlib.Path:
    """Absolute path of a shipped file named as in the manifest (e.g. 'digits_cnn/w8a8.onnx')."""
    return ROOT / relative
