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


def reliability_bins(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, np.ndarray]:
    """The softmax confidence in equal-width bins (lo, hi]: ``edges`` (bins + 1) and per bin the image
    ``count``, the mean ``confidence`` and the ``accuracy`` (NaN where the bin is empty). The
    reliability diagram draws them; `calibration_error` sums them into the ECE."""
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    correct = pred == np.asarray(labels)
    # Confidence is always > 0, so every image lands in one bin.
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    mean_conf, accuracy = np.full(bins, np.nan), np.full(bins, np.nan)
    for b in np.flatnonzero(count):
        in_bin = which == b
        mean_conf[b], accuracy[b] = conf[in_bin].mean(), correct[in_bin].mean()
    return {"edges": np.linspace(0, 1, bins + 1), "confidence": mean_conf, "accuracy": accuracy, "count": count}


def calibration_error(r: dict[str, np.ndarray]) -> float:
    """Expected calibration error (Guo et al. 2017) of `reliability_bins`: the image-weighted mean over
    the bins of |accuracy - mean confidence|."""
    total = 0.0
    for b in np.flatnonzero(r["count"]):
        total += r["count"][b] * abs(r["accuracy"][b] - r["confidence"][b])
    return float(total / r["count"].sum())


def ece(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the softmax confidence over ``bins`` equal-width bins."""
    return calibration_error(reliability_bins(logits, labels, bins))
