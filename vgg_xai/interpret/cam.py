"""Class activation maps for a batch, by four methods that differ only in how the layer's
activations A (N, C, h, w) are weighted into one map per image.

    gradcam    channel weights = spatial mean of dScore/dA            (Captum LayerGradCam)
    hirescam   elementwise dScore/dA * A, summed over channels        (Captum LayerGradientXActivation)
    gradcam++  channel weights from 1st-3rd powers of the gradients  (here, as pytorch-grad-cam,
                                                                      its 1e-6 in the denominator too)
    cam        channel weights = the classifier's row for the target  (head=linear only)

Every map is rectified (positive evidence for the target), bilinearly upsampled to the input
size and min-max scaled per image to [0, 1]; a map with no positive evidence is all zeros.
`signed_cam` keeps the unrectified map instead (upsampled, scaled by its largest absolute value,
so zero stays zero): the model-randomization check ranks its absolute values (Adebayo et al.'s
ABS variant), where a rectified map would throw away the negative evidence.
The model runs `prepared` (eval mode, in-place ReLUs switched off; both restored afterwards),
on a copy of the images; gradients are taken with ``torch.autograd.grad`` and never
accumulate into the parameters' ``.grad``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam, LayerGradientXActivation
from torch import nn

from .hooks import as_input, capture, chunk_size, module_by_name, prepared

METHODS = ("gradcam", "hirescam", "gradcam++", "cam")
GRADCAM_PP_EPS = 1e-6  # pytorch-grad-cam's


def default_layer(model: nn.Module) -> str:
    """The last conv layer's rectified output (its ReLU), the maps Grad-CAM was defined on;
    the last conv itself where no ReLU follows it."""
    children = list(model.features.named_children())
    last, _ = model.last_conv()
    i = [n for n, _ in children].index(last)
    for n, m in children[i + 1:]:
        if isinstance(m, nn.Conv2d):
            break
        if isinstance(m, nn.ReLU):
            return n
    return last


def gap_input_layer(model: nn.Module) -> str:
    """The last layer of ``model.features``: its output is what the global average pool sees."""
    return list(model.features.named_children())[-1][0]


def cam(model: nn.Module, images: torch.Tensor, method: str = "gradcam",
        targets: torch.Tensor | np.ndarray | list[int] | int | None = None,
        layer: str | None = None, batch_size: int | None = None) -> np.ndarray:
    """Maps (N, H, W) in [0, 1] for normalized images (N, 3, H, W).

    targets: class per image (or one for all); default the model's prediction.
    layer: a layer name of ``model.features``; default `default_layer`. Plain ``cam`` always
    uses `gap_input_layer`, the only layer where it is exact.
    batch_size: images per forward and backward pass (default `hooks.chunk_size`; each image's
    map is its own, so the chunks do not change the maps).
    """
    return rectified(raw_cam(model, images, method, targets, layer, batch_size), images.shape[-2:])


def signed_cam(model: nn.Module, images: torch.Tensor, method: str = "gradcam",
               targets: torch.Tensor | np.ndarray | list[int] | int | None = None,
               layer: str | None = None, batch_size: int | None = None) -> np.ndarray:
    """The unrectified maps (N, H, W) in [-1, 1] (see `signed`)."""
    return signed(raw_cam(model, images, method, targets, layer, batch_size), images.shape[-2:])


def rectified(raw: torch.Tensor, size: torch.Size) -> np.ndarray:
    """`raw_cam`'s maps as `cam` gives them: rectified, upsampled to ``size``, min-max scaled to [0, 1]."""
    return _upsample_normalize(raw.clamp_min(0), size)


def signed(raw: torch.Tensor, size: torch.Size) -> np.ndarray:
    """`raw_cam`'s maps unrectified: upsampled to ``size`` and divided by each map's largest absolute
    value, so zero stays zero (all zeros where the map is)."""
    up = F.interpolate(raw[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    top = up.abs().amax((1, 2), keepdim=True)
    return torch.where(top > 0, up / top.clamp_min(1e-30), torch.zeros_like(up)).cpu().numpy()


def raw_cam(model: nn.Module, images: torch.Tensor, method: str = "gradcam",
            targets: torch.Tensor | np.ndarray | list[int] | int | None = None,
            layer: str | None = None, batch_size: int | None = None) -> torch.Tensor:
    """The maps at the layer's resolution (N, h, w), unrectified: `cam` and `signed_cam` are made from them."""
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    if method == "cam":
        if len(model.head) > 0:
            raise ValueError("plain CAM needs head=linear (global average pool straight into the "
                             "classifier); use method='gradcam' for this model")
        if layer not in (None, gap_input_layer(model)):
            raise ValueError(f"plain CAM is defined only at {gap_input_layer(model)!r}, the input "
                             f"of the global average pool; got layer={layer!r}")
        layer = gap_input_layer(model)
    layer = layer or default_layer(model)
    module_by_name(model, layer)  # a clear error for an unknown name
    x = as_input(model, images)
    size = batch_size or chunk_size(x.device)
    with prepared(model):
        t = _targets(model, x, targets)
        return torch.cat([_RAW[method](model, x[i:i + size], t[i:i + size], layer).detach()
                          for i in range(0, len(x), size)])


def _targets(model: nn.Module, x: torch.Tensor, targets) -> torch.Tensor:
    if targets is None:
        with torch.no_grad():
            return model(x).argmax(1)
    t = torch.as_tensor(targets, dtype=torch.long, device=x.device).reshape(-1)
    return t.expand(len(x)).contiguous() if t.numel() == 1 else t


def _gradcam(model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: str) -> torch.Tensor:
    a = LayerGradCam(model, module_by_name(model, layer)).attribute(x, target=t, relu_attributions=False)
    return a[:, 0]


def _hirescam(model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: str) -> torch.Tensor:
    a = LayerGradientXActivation(model, module_by_name(model, layer)).attribute(x, target=t)
    return a.sum(1)


def _gradcam_pp(model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: str) -> torch.Tensor:
    acts, grads = activations_and_gradients(model, x, t, layer)
    return (gradcam_pp_weights(acts, grads)[:, :, None, None] * acts).sum(1)


def _plain_cam(model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: str) -> torch.Tensor:
    with capture(model, [layer]) as rec, torch.no_grad():
        model.features(x)
    w = model.classifier.weight.detach()[t]  # (N, C): the target's row of the classifier
    return torch.einsum("nc,nchw->nhw", w, rec.outputs[layer])


_RAW: dict[str, Callable[..., torch.Tensor]] = {
    "gradcam": _gradcam, "hirescam": _hirescam, "gradcam++": _gradcam_pp, "cam": _plain_cam,
}


def activations_and_gradients(model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                              layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's activations and d(target logit)/d(activations), both (N, C, h, w), from one
    forward and one backward pass of the whole batch."""
    x = x.detach().requires_grad_(True)  # so the graph exists even with frozen parameters
    with torch.enable_grad(), capture(model, [layer]) as rec:
        score = model(x).gather(1, t[:, None]).sum()
        acts = rec.outputs[layer]
        (grads,) = torch.autograd.grad(score, acts)
    return acts.detach(), grads


def gradcam_pp_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ channel weights (N, C) (Chattopadhay et al. 2018), with the exponential-score
    simplification pytorch-grad-cam uses: higher derivatives as powers of the first, and its 1e-6 in
    the denominator (squared gradients of a trained VGG's last layer have a median near 2e-7, so the
    constant matters; a smaller one gave maps with a Pearson correlation as low as 0.987)."""
    g2 = grads.pow(2)
    g3 = g2 * grads
    denom = 2 * g2 + acts.sum((2, 3), keepdim=True) * g3
    alpha = torch.where(grads != 0, g2 / (denom + GRADCAM_PP_EPS), torch.zeros_like(g2))
    return (alpha * grads.clamp_min(0)).sum((2, 3))


def _upsample_normalize(raw: torch.Tensor, size: torch.Size) -> np.ndarray:
    up = F.interpolate(raw[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    lo = up.amin((1, 2), keepdim=True)
    span = up.amax((1, 2), keepdim=True) - lo
    out = torch.where(span > 0, (up - lo) / span.clamp_min(1e-12), torch.zeros_like(up))
    return out.cpu().numpy()
