"""Metrics of a session's outputs. Class scores (a softmax head): top-1 accuracy and mean cross-entropy.
A Sigmoid head's probabilities p [N, K] against 0/1 labels (a detector, or K labels per example): accuracy
at p > 0.5, the mean binary cross-entropy, and how detectors are judged:

    ROC AUC    P(score of a positive > score of a negative), ties counting ½: by ranks (Mann-Whitney),
               AUC = (Σ ranks of the positives − P(P+1)/2) / (P·N), tied scores sharing their mean rank
    miss rate  at false-alarm rate F: the threshold t is the lowest score of the negatives that keeps
               FAR = #(negatives > t) / N <= F; the miss rate is #(positives <= t) / P
With K > 1 labels each is the mean over the labels whose data holds both classes (None when none does).
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .data import Inputs, feeds

FALSE_ALARM = 0.05   # the false-alarm rate the miss rate is read at unless given (`eval --false-alarm`)
P_CLIP = 1e-7        # a quantized probability of exactly 0 or 1 would make the log loss infinite


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def nll(p: np.ndarray, y: np.ndarray) -> float:
    """Cross-entropy of a Softmax output's probabilities (clipped: an 8-bit probability may be 0)."""
    return float(-np.log(np.clip(p[np.arange(len(y)), y].astype(np.float64), P_CLIP, 1)).mean())


def binary_cross_entropy(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p.astype(np.float64), P_CLIP, 1 - P_CLIP)
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """The ROC AUC of 1-D scores against 0/1 labels, or None without both classes."""
    pos, n_pos = labels == 1, int((labels == 1).sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0     # ranks from 1; a tie shares its mean rank
    ranks = mean_rank[inverse.ravel()]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def miss_rate_at(scores: np.ndarray, labels: np.ndarray, false_alarm: float = FALSE_ALARM) -> float | None:
    """The share of positives at or below the lowest threshold whose false-alarm rate is <= false_alarm,
    or None without both classes."""
    neg, pos = np.sort(scores[labels != 1])[::-1], scores[labels == 1]
    if len(neg) == 0 or len(pos) == 0:
        return None
    k = int(np.floor(false_alarm * len(neg)))   # false alarms allowed; exact in k / N, not in float
    while (k + 1) / len(neg) <= false_alarm:
        k += 1
    while k > 0 and k / len(neg) > false_alarm:
        k -= 1
    threshold = neg[k] if k < len(neg) else -np.inf
    return float((pos <= threshold).mean())


def _per_label(metric, p: np.ndarray, y: np.ndarray, *args) -> float | None:
    values = [v for v in (metric(p[:, j], y[:, j], *args) for j in range(p.shape[1])) if v is not None]
    return float(np.mean(values)) if values else None


def detection(p: np.ndarray, y: np.ndarray, false_alarm: float = FALSE_ALARM) -> dict:
    """The metrics of a Sigmoid head's probabilities p [N, K] against labels y ([N] when K = 1, or [N, K])."""
    y = y.reshape(len(p), -1)
    return {"accuracy": float(((p > 0.5) == (y == 1)).mean()), "loss": binary_cross_entropy(p, y),
            "auc": _per_label(roc_auc, p, y), "miss_rate": _per_label(miss_rate_at, p, y, false_alarm),
            "false_alarm": false_alarm, "samples": len(y)}


def score(sess: ort.InferenceSession, data_input: str, x: np.ndarray, y: np.ndarray, state: dict,
          batch: int = 512, head: str = "softmax", false_alarm: float = FALSE_ALARM,
          probabilities: bool = False) -> dict:
    """Run `sess` over x (an array, or Inputs for several data inputs) in batches (state tensors fed
    alongside) and score its first output (a Sigmoid head's by `detection`). A model with a fixed batch
    N runs in chunks of N; the last chunk is padded with its first sample and the padding's outputs
    dropped. `probabilities`: the output is a Softmax's, whose cross-entropy is its own negative log."""
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
    out = np.concatenate(chunks)
    if head == "sigmoid":
        return detection(out, y, false_alarm)
    loss = nll(out, y) if probabilities else cross_entropy(out, y)
    return {"accuracy": float((out.argmax(1) == y).mean()), "loss": loss, "samples": len(y)}
