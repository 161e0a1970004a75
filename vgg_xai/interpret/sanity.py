"""Model-randomization sanity check (Adebayo et al. 2018, cascading): does a map method depend
on the learned weights? Layers are re-initialized from the top down, and after each step the
maps are compared with the trained model's by Spearman rank correlation. A method that
passes loses correlation as layers are randomized; an edge detector would not.

One draw of the random weights over a few images moves the final correlation by +-0.15, so
`randomization_check` repeats the cascade over several draws and reports the mean and standard
deviation of two statistics (Adebayo et al. report both):

    signed  Spearman correlation of the rectified maps (the ones the suite shows);
    ABS     Spearman correlation of the absolute values of the unrectified maps: a map that turns
            into its own negative is as dependent on the weights as one that keeps its sign, and
            the negative evidence a rectified map drops is ranked too.

Neither is 0 for unrelated maps: two CAMs of different images of one network share the coarse
layout of the upsampled maps, so `randomization_check` also gives each statistic's noise floor,
the same correlation between the trained maps of different images (image i against image i + 1).
A method passes where the randomized maps correlate with the trained ones no more than that.
(The mean of |signed rho| that an earlier version reported sits at 0.2-0.25 even for maps of
unrelated images, so it could not fail: it is gone.)
A map that is all zero or constant has no ranking: its correlation is undefined (NaN), left out
of every mean and counted, never scored as 0.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from .cam import raw_cam, rectified, signed
from .degenerate import flat_maps
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
    Returns ``layers`` (names, in order), ``spearman`` (mean over images after each step, over
    the images where it is defined), ``spearman_per_image`` (steps, N), NaN where the trained or
    the randomized map is flat (all zero or constant), ``abs_spearman_per_image`` (steps, N), the
    ABS statistic, ``maps`` (steps + 1, N, H, W), the trained model's rectified maps first, and
    ``signed_maps`` (N, H, W), the trained model's unrectified maps.
    """
    net = copy.deepcopy(model)  # the caller's model is never touched
    x = as_input(net, images)
    if targets is None:
        with prepared(net), torch.no_grad():
            targets = net(x).argmax(1).cpu().numpy()
    size = x.shape[-2:]
    raw = raw_cam(net, x, method, targets, layer)
    reference, reference_abs = rectified(raw, size), np.abs(signed(raw, size))
    names = randomization_order(net)
    g = torch.Generator().manual_seed(seed)
    maps, rho, rho_abs = [reference], [], []
    for name in names:
        _reinit(module_by_name(net, name), g)
        raw = raw_cam(net, x, method, targets, layer)
        maps.append(rectified(raw, size))
        rho.append(spearman_rows(reference, maps[-1]))
        rho_abs.append(spearman_rows(reference_abs, np.abs(signed(raw, size))))
    per_image = np.stack(rho)
    return {"layers": names, "spearman": _nanmean(per_image, axis=1), "spearman_per_image": per_image,
            "abs_spearman_per_image": np.stack(rho_abs), "maps": np.stack(maps),
            "signed_maps": reference_abs}


def randomization_check(model: nn.Module, images: torch.Tensor, method: str = "gradcam", draws: int = 3,
                        seed: int = 0, targets: np.ndarray | None = None, layer: str | None = None) -> dict:
    """`cascading_randomization` with ``draws`` independent draws of the random weights (seeds
    ``seed``, ``seed + 1``, ...), summarized per step over every defined (draw, image) pair.

    Returns ``layers``; per step (steps,): ``spearman`` and ``spearman_std`` (mean and standard
    deviation of the signed correlation), ``abs_spearman`` and ``abs_spearman_std`` (of the ABS
    statistic), ``n_pairs`` (the pairs defined), ``n_degenerate`` (left out: the trained or the
    randomized map flat) and ``n_compared`` (draws x images); the noise floors ``floor`` and
    ``abs_floor`` with ``*_std`` and ``*_n`` (each statistic between the trained maps of different
    images); ``spearman_per_draw`` (draws, steps), the mean of each draw; ``n_draws``, ``n_images``
    and ``flat_trained`` (images whose trained map is flat, left out at every step); ``maps`` of the
    first draw. A statistic with no defined pair is NaN.
    """
    runs = [cascading_randomization(model, images, method, seed + d, targets, layer) for d in range(draws)]
    rho = np.stack([r["spearman_per_image"] for r in runs])  # (draws, steps, N)
    pairs = np.moveaxis(rho, 1, 0).reshape(rho.shape[1], -1)  # (steps, draws * N)
    rho_abs = np.stack([r["abs_spearman_per_image"] for r in runs])
    pairs_abs = np.moveaxis(rho_abs, 1, 0).reshape(rho_abs.shape[1], -1)
    n = np.isfinite(pairs).sum(axis=1)
    trained, trained_abs = runs[0]["maps"][0], runs[0]["signed_maps"]
    floor = spearman_rows(trained, np.roll(trained, 1, axis=0))  # image i against image i - 1
    floor_abs = spearman_rows(trained_abs, np.roll(trained_abs, 1, axis=0))
    one = lambda a: a[None]  # noqa: E731 - a (N,) row as (1, N) for the per-step helpers
    return {
        "layers": runs[0]["layers"], "spearman": _nanmean(pairs, axis=1), "spearman_std": _nanstd(pairs, axis=1),
        "abs_spearman": _nanmean(pairs_abs, axis=1), "abs_spearman_std": _nanstd(pairs_abs, axis=1),
        "n_pairs": n, "n_degenerate": pairs.shape[1] - n, "n_compared": pairs.shape[1],
        "floor": float(_nanmean(one(floor), 1)[0]), "floor_std": float(_nanstd(one(floor), 1)[0]),
        "floor_n": int(np.isfinite(floor).sum()), "abs_floor": float(_nanmean(one(floor_abs), 1)[0]),
        "abs_floor_std": float(_nanstd(one(floor_abs), 1)[0]), "abs_floor_n": int(np.isfinite(floor_abs).sum()),
        "spearman_per_draw": np.stack([r["spearman"] for r in runs]),
        "n_draws": draws, "n_images": rho.shape[2], "flat_trained": int(flat_maps(trained).sum()),
        "maps": runs[0]["maps"],
    }


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    n = np.isfinite(a).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.nansum(a, axis=axis) / n, np.nan)


def _nanstd(a: np.ndarray, axis: int) -> np.ndarray:
    """The standard deviation (ddof 0) over the finite values; NaN where there are none."""
    mean = np.expand_dims(_nanmean(a, axis), axis)
    return np.sqrt(_nanmean((a - mean) ** 2, axis))


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each image's map in ``a`` with the same image's in ``b`` (N,);
    NaN where either map is flat (all zero or constant: no ranking to correlate)."""
    ra = rankdata(np.asarray(a).reshape(len(a), -1), axis=1)
    rb = rankdata(np.asarray(b).reshape(len(b), -1), axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    norm = np.sqrt((ra ** 2).sum(axis=1) * (rb ** 2).sum(axis=1))
    defined = (norm > 0) & ~flat_maps(a) & ~flat_maps(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(defined, (ra * rb).sum(axis=1) / norm, np.nan)


def _reinit(m: nn.Module, g: torch.Generator) -> None:
    """PyTorch's default init for Linear and Conv2d, drawn from ``g`` (not the global RNG)."""
    w = torch.empty(m.weight.shape)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
    with torch.no_grad():
        m.weight.copy_(w)
        if m.bias is not None:
            bound = 1 / math.sqrt(w[0].numel())
            m.bias.copy_(torch.empty(m.bias.shape).uniform_(-bound, bound, generator=g))
