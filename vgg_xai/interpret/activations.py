"""What BatchNorm does to the activations it sees: histograms before and after each BN layer."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .hooks import as_input, capture


def bn_histograms(model: nn.Module, images: torch.Tensor, bins: int = 60) -> dict[str, dict]:
    """For each BatchNorm layer (by name, in order): ``{"before": {"counts", "edges"},
    "after": {"counts", "edges"}}`` of its input and output over all channels and positions,
    on one forward pass of ``images`` in eval mode (running statistics, as at test time).

    Each histogram spans its own data range. Empty for a model without BatchNorm. Memory grows
    with the batch (every BN input and output is kept at once): a fixed batch of a few hundred
    images is the intended use.
    """
    names = [n for n, _ in model.batchnorms()]
    if not names:
        return {}
    x = as_input(model, images)
    with capture(model, names, inputs=True) as rec, torch.no_grad():
        model.features(x)
    out = {}
    for n in names:
        out[n] = {"before": _histogram(rec.inputs[n], bins), "after": _histogram(rec.outputs[n], bins)}
    return out


def _histogram(t: torch.Tensor, bins: int) -> dict[str, np.ndarray]:
    counts, edges = np.histogram(t.detach().float().cpu().numpy().ravel(), bins=bins)
    return {"counts": counts.astype(np.int64), "edges": edges}
