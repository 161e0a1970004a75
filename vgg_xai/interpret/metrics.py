"""Classification metrics from labels, predictions and logits."""

from __future__ import annotations

import numpy as np


def confusion(labels: np.ndarray, preds: np.ndarray, n: int = 10) -> np.ndarray:
    """Counts (n, n): row = true class, column = predicted class."""
    table = np.zeros((n, n), dtype=np.int64)
    np.add.at(table, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return table


def per_class_accuracy(labels: np.ndarray, preds: np.ndarray, n: int = 10) -> np.ndarray:
    """Share of each class predicted correctly (recall), (n,); NaN for a class with no images."""
    table = confusion(labels, preds, n)
    support = table.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(table) / support, np.nan)


def ece(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the softmax confidence (Guo et al. 2017): over equal-width
    confidence bins, the image-weighted mean of |accuracy - mean confidence|."""
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    correct = pred == np.asarray(labels)
    # Bins (lo, hi]; confidence is always > 0, so every image lands in one.
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.sum() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(total / len(conf))
