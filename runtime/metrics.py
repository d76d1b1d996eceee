"""Classification metrics of a session's logits: top-1 accuracy and mean cross-entropy."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .data import Inputs, feeds


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def score(sess: ort.InferenceSession, data_input: str, x: np.ndarray, y: np.ndarray, state: dict,
          batch: int = 512) -> dict:
    """Run `sess` over x (an array, or Inputs for several data inputs) in batches (state tensors fed
    alongside) and score its first output. A model with a fixed batch N runs in chunks of N; the last
    chunk is padded with its first sample and the padding's outputs dropped."""
    fixed = next(i.shape[0] for i in sess.get_inputs() if i.name == data_input)
    names = {i.name for i in sess.get_inputs()}
    state = {k: v for k, v in state.items() if k in names}   # training buffers are not inputs of eval
    size = fixed if isinstance(fixed, int) and fixed > 0 else batch
    chunks = []
    for i in range(0, len(x), size):
        xb = x[i:i + size]
        pad = size - len(xb) if size == fixed else 0
        if pad:
            xb = xb.padded(pad) if isinstance(xb, Inputs) else np.concatenate([xb, np.repeat(xb[:1], pad, axis=0)])
        chunks.append(sess.run(None, {**feeds(data_input, xb), **state})[0][:size - pad])
    logits = np.concatenate(chunks)
    return {"accuracy": float((logits.argmax(1) == y).mean()), "loss": cross_entropy(logits, y), "samples": len(y)}
