"""Model-randomization sanity check (Adebayo et al. 2018, cascading): does a map method depend
on the learned weights? Layers are re-initialized from the top down, and after each step the
maps are compared with the trained model's by Spearman rank correlation. A method that
passes loses correlation as layers are randomized; an edge detector would not.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from .cam import cam
from .hooks import as_input, module_by_name, prepared


def randomization_order(model: nn.Module) -> list[str]:
    """Layer names from the top: classifier, the head's Linears from the last, conv layers
    from the last. BatchNorm parameters and running statistics are left as trained."""
    head = [f"head.{n}" for n, m in model.head.named_children() if isinstance(m, nn.Linear)]
    convs = [n for n, _ in model.conv_layers()]
    return ["classifier", *reversed(head), *reversed(convs)]


def cascading_randomization(model: nn.Module, images: torch.Tensor, method: str = "gradcam",
                            seed: int = 0, targets: np.ndarray | None = None,
                            layer: str | None = None) -> dict:
    """Randomize a deepcopy of ``model`` layer by layer (`randomization_order`) and compare maps.

    Targets stay fixed (default: the trained model's predictions) so only the weights change.
    Returns ``layers`` (names, in order), ``spearman`` (mean over images after each step),
    ``spearman_per_image`` (steps, N) and ``maps`` (steps + 1, N, H, W), the trained model's
    maps first. A map that becomes constant has correlation 0 with anything.
    """
    net = copy.deepcopy(model)  # the caller's model is never touched
    x = as_input(net, images)
    if targets is None:
        with prepared(net), torch.no_grad():
            targets = net(x).argmax(1).cpu().numpy()
    reference = cam(net, x, method, targets, layer)
    names = randomization_order(net)
    g = torch.Generator().manual_seed(seed)
    maps, rho = [reference], []
    for name in names:
        _reinit(module_by_name(net, name), g)
        maps.append(cam(net, x, method, targets, layer))
        rho.append(spearman_rows(reference, maps[-1]))
    per_image = np.stack(rho)
    return {"layers": names, "spearman": per_image.mean(axis=1), "spearman_per_image": per_image,
            "maps": np.stack(maps)}


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each image's map in ``a`` with the same image's in ``b`` (N,)."""
    ra = rankdata(np.asarray(a).reshape(len(a), -1), axis=1)
    rb = rankdata(np.asarray(b).reshape(len(b), -1), axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    norm = np.sqrt((ra ** 2).sum(axis=1) * (rb ** 2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (ra * rb).sum(axis=1) / norm, 0.0)


def _reinit(m: nn.Module, g: torch.Generator) -> None:
    """PyTorch's default init for Linear and Conv2d, drawn from ``g`` (not the global RNG)."""
    w = torch.empty(m.weight.shape)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
    with torch.no_grad():
        m.weight.copy_(w)
        if m.bias is not None:
            bound = 1 / math.sqrt(w[0].numel())
            m.bias.copy_(torch.empty(m.bias.shape).uniform_(-bound, bound, generator=g))
