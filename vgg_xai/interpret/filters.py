"""Conv filters and feature maps of a model.

Feature maps are the conv layer's own output (before BatchNorm and ReLU): that is what the
filter computes, and it keeps the sign, which the ReLU would hide. Ask for ``reluN`` (or
``bnN``) by name to get the later stages.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .hooks import as_input, capture, module_by_name


def conv_weights(model: nn.Module, layer_name: str) -> np.ndarray:
    """The weights (out, in, kh, kw) of a conv layer, as a copy."""
    m = module_by_name(model, layer_name)
    if not isinstance(m, nn.Conv2d):
        raise ValueError(f"layer {layer_name!r} is a {type(m).__name__}, not a Conv2d")
    return m.weight.detach().cpu().numpy().copy()


def feature_maps(model: nn.Module, layer_name: str, images: torch.Tensor) -> np.ndarray:
    """Output (N, C, H, W) of a layer of ``model.features`` for normalized images (N, 3, H, W);
    for a conv layer its raw output, before BatchNorm and ReLU. Model in eval mode."""
    x = as_input(model, images)
    with capture(model, [layer_name]) as rec, torch.no_grad():
        model.features(x)
    return rec.outputs[layer_name].float().cpu().numpy()


def through_every_conv(model: nn.Module, image: torch.Tensor) -> dict[str, np.ndarray]:
    """One normalized image (3, H, W) or (1, 3, H, W) through the net: each conv layer's output
    (C, H, W), by layer name in order. One forward pass."""
    x = as_input(model, image)
    if x.ndim == 3:
        x = x[None]
    if x.shape[0] != 1:
        raise ValueError(f"image: expected one image, got a batch of {x.shape[0]}")
    names = [n for n, _ in model.conv_layers()]
    with capture(model, names) as rec, torch.no_grad():
        model.features(x)
    return {n: rec.outputs[n][0].float().cpu().numpy() for n in names}
