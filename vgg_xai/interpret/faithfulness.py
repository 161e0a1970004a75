"""Does a map point at what the model uses? Deletion and insertion curves (Petsiuk et al. 2018, RISE).

Pixels (all three channels of a position together) are ranked by the map, highest first. Step
by step a growing share of them is
    deletion:  replaced by a baseline, from the image to the baseline;
    insertion: copied from the image onto the baseline, from the baseline to the image;
and the softmax probability of the target class is recorded. The area under that curve over
the share of pixels (trapezoid, in [0, 1]) is the score: low is good for deletion, high for
insertion. The default baseline for both is ``"zero"``: in normalized input, the training
set's mean colour everywhere, so the two curves run between the same two images. ``"blur"``
(Gaussian, kernel 11, sigma 5, RISE's insertion start) is offered, but at 32x32 it keeps the
coarse colour layout that CIFAR models read, so an insertion from it starts near the end.

Ties: a rectified map has many pixels of exactly the same value (up to 40% zeros). Their order is
fixed, never drawn anew: pixels of equal map value are ordered by ``tiebreak`` (highest first),
then by position (row-major). The suite passes the random baseline map as ``tiebreak`` (drawn
once with a fixed seed, the same for every trial): ties are then broken exactly as the random
map would order them, so an all-zero map scores exactly as the random baseline does. Without a
``tiebreak``, ties go in row-major order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from .hooks import as_input, chunk_size, inference_copy

BASELINES = ("zero", "blur")


def deletion_auc(model: nn.Module, images: torch.Tensor, maps: np.ndarray, targets: np.ndarray,
                 steps: int = 16, baseline: str = "zero", tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Area under the deletion curve, per image (N,); lower means a more faithful map."""
    _, probs = perturbation_curves(model, images, maps, targets, "deletion", steps, baseline, tiebreak)
    return curve_auc(probs)


def insertion_auc(model: nn.Module, images: torch.Tensor, maps: np.ndarray, targets: np.ndarray,
                  steps: int = 16, baseline: str = "zero", tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Area under the insertion curve, per image (N,); higher means a more faithful map."""
    _, probs = perturbation_curves(model, images, maps, targets, "insertion", steps, baseline, tiebreak)
    return curve_auc(probs)


def perturbation_curves(model: nn.Module, images: torch.Tensor, maps: np.ndarray, targets: np.ndarray,
                        mode: str = "deletion", steps: int = 16, baseline: str = "zero",
                        tiebreak: np.ndarray | None = None,
                        batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The curves themselves: shares of pixels changed (steps + 1,) and the target-class
    probability (N, steps + 1). One batched forward per step, in chunks of ``batch_size``
    (default `hooks.chunk_size`), through an `inference_copy` of the model.

    tiebreak: (N, H, W) or (H, W), the order of pixels of equal map value (highest first);
    default row-major order.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode: {mode!r} is not deletion or insertion")
    if baseline not in BASELINES:
        raise ValueError(f"baseline: {baseline!r} is not one of {', '.join(BASELINES)}")
    x = as_input(model, images)
    n, _, h, w = x.shape
    m = np.asarray(maps, dtype=np.float64).reshape(n, -1)
    if m.shape[1] != h * w:
        raise ValueError(f"maps: expected (N, {h}, {w}) to match the images, got {np.shape(maps)}")
    t = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=x.device).reshape(n, 1)
    base = torch.zeros_like(x) if baseline == "zero" else gaussian_blur(x, kernel_size=11, sigma=5.0)

    order = pixel_order(m, tiebreak)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(h * w), order.shape), axis=-1)
    rank_t = torch.as_tensor(rank, device=x.device).reshape(n, 1, h, w)

    counts = np.round(np.linspace(0, h * w, steps + 1)).astype(np.int64)
    probs = np.empty((n, steps + 1))
    net, size = inference_copy(model), batch_size or chunk_size(x.device)
    with torch.no_grad():
        for k, c in enumerate(counts):
            top = rank_t < int(c)
            xk = torch.where(top, base, x) if mode == "deletion" else torch.where(top, x, base)
            probs[:, k] = torch.cat([
                net(xk[i:i + size]).float().softmax(1).gather(1, t[i:i + size])[:, 0] for i in range(0, n, size)
            ]).cpu().numpy()
    return counts / (h * w), probs


def pixel_order(maps: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Per map (N, ...), its flat pixel indices from the highest value down; equal values by
    ``tiebreak`` (same shape or one map's, highest first), then by index (lexsort is stable)."""
    m = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    if tiebreak is None:
        return np.argsort(-m, axis=-1, kind="stable")
    t = np.broadcast_to(np.asarray(tiebreak, dtype=np.float64).reshape(-1, m.shape[1]), m.shape)
    return np.lexsort((-t, -m), axis=-1)


def curve_auc(probs: np.ndarray) -> np.ndarray:
    """Area under each curve (N, S) sampled on an even grid of [0, 1], per curve (N,)."""
    # Trapezoid on an even grid of [0, 1] (np.trapezoid is numpy >= 2 only).
    return (probs[:, 1:] + probs[:, :-1]).sum(axis=1) / (2 * (probs.shape[1] - 1))
