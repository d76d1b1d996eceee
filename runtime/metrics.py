"""Classification metrics of a session's logits: top-1 accuracy and mean cross-entropy."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def score(sess: ort.InferenceSession, data_input: str, x: np.ndarray, y: np.ndarray, state: dict,
          batch: int = 512) -> dict:
    """Run `sess` over x in batches (state tensors fed alongside) and score its first output."""
    logits = np.concatenate([sess.run(None, {data_input: x[i:i + batch], **state})[0]
                             for i in range(0, len(x), batch)])
    return {"accuracy": float((logits.argmax(1) == y).mean()), "loss": cross_entropy(logits, y), "samples": len(y)}
