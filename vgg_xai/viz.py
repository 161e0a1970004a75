"""Figures from arrays: numpy arrays and plain dicts in, matplotlib figures out.

Drawing only (no torch, h5py or ray): every function returns a `Figure` that needs no pyplot
state, and `save` writes it as a PNG atomically and releases it, so a post-processing run that
draws hundreds of figures does not grow in memory.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # batch jobs have no display; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402  (only to close figures a caller made with pyplot)
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.colors import Colormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 100
MAP_CMAP = "viridis"
WEIGHT_CMAP = "coolwarm"
CAM_CMAP = "jet"
CAM_ALPHA = 0.5
MAX_WIDTH = 24.0   # inches; only the many-trial grids get near it
MAX_HEIGHT = 18.0
GUTTER = 2         # white pixels between the tiles of an image mosaic
LEFT_OUT_GREY = 0.9  # the panel of a trial a sweep grid has nothing to show for
PNG_COMPRESS = 6   # zlib level of the PNGs (PIL's default)


def save(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically, then release the figure; returns the path."""
    # checkpoint imports torch, which drawing must not need: load it only when a file is written.
    from vgg_xai.atomic import atomic_write_bytes

    path = Path(path)
    try:
        # The temporary name ends in ".tmpPID", so the format cannot come from the suffix.
        atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi,
                                                         pil_kwargs={"compress_level": PNG_COMPRESS}))
    finally:
        # pyplot keeps the figures it made until closed (for any other Figure this is a cheap no-op);
        # a Figure made here is freed with its last reference. No fig.clear(): clearing rebuilds
        # every Axes' ticks, which cost as much as drawing them.
        plt.close(fig)
    return path


# ---------------------------------------------------------------- per trial


def curves(history: dict[str, np.ndarray]) -> Figure:
    """Loss and accuracy vs epoch, train and valid; non-finite points (a diverged epoch) are left out."""
    fig, axes = _figure(10, 4, 1, 2, wspace=0.8)
    epoch = np.asarray(history["epoch"], dtype=float)
    for ax, what in zip(axes[0], ("loss", "acc")):
        for split, style in (("train", "o-"), ("valid", "s--")):
            y = np.asarray(history[f"{split}_{what}"], dtype=float)
            ok = np.isfinite(y) & np.isfinite(epoch)
            ax.plot(epoch[ok], y[ok], style, ms=3, label=split)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no tick at 1.5
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss" if what == "loss" else "accuracy")
        ax.set_title("loss" if what == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def bn_histograms(hists: dict[str, dict]) -> Figure:
    """One panel per BatchNorm layer: the histogram of its input (before) and output (after)."""
    if not hists:
        raise ValueError("bn_histograms: no BatchNorm layers to draw (the model has no BatchNorm)")
    n = len(hists)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = _figure(3 * ncols, 2.4 * nrows + 0.4, nrows, ncols, left=0.65, right=0.15, top=0.7, bottom=0.5,
                        wspace=0.7, hspace=0.75)
    axes = axes.ravel()
    for ax, (name, h) in zip(axes, hists.items()):
        for key, colour in (("before", "tab:blue"), ("after", "tab:orange")):
            # A log axis cannot show 0: empty bins are drawn at 0.5, the bottom of the axis.
            counts = np.maximum(np.asarray(h[key]["counts"], dtype=float), 0.5)
            ax.stairs(counts, h[key]["edges"], baseline=0.5, color=colour, label=key)
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5)
        ax.set_title(name)
        ax.set_xlabel("activation")
        ax.set_ylabel("count")
    for ax in axes[n:]:
        ax.remove()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncols=2, bbox_to_anchor=(1, 1 - 0.02 / fig.get_figheight()))
    fig.suptitle("activations before and after BatchNorm", y=1 - 0.08 / fig.get_figheight(), va="top")
    return fig


def weights_rgb(weights: np.ndarray, scale: float | None = None) -> np.ndarray:
    """First-layer filters (out, 3, kh, kw) as RGB patches (out, kh, kw, 3) in [0, 1].

    One scale symmetric about 0 for every filter: a weight ``w`` shows as ``0.5 + 0.5 * w / scale``
    in its colour channel, so a zero weight is mid-grey, a filter's colour balance is kept, and
    filters (or two models drawn with the same ``scale``) compare by strength as well as by
    pattern. ``scale`` defaults to the largest |weight|; values beyond it are clipped. Channels-last,
    so each patch goes straight to ``imshow``.
    """
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"weights: expected (out, 3, kh, kw) of a first conv layer, got {w.shape}")
    scale = _symmetric(w) if scale is None else scale  # all zero: 1, everything mid-grey
    if not scale > 0:
        scale = 1.0
    return np.clip(0.5 + 0.5 * w / scale, 0, 1).transpose(0, 2, 3, 1).astype(np.float32)


def filters_rgb(init_w: np.ndarray, trained_w: np.ndarray) -> Figure:
    """First-layer filters (out, 3, kh, kw) as RGB patches: untrained and trained on one colour
    scale symmetric about 0 (grey = 0), so what training changed in strength shows, then their
    difference (trained - untrained) on its own scale."""
    init_w, trained_w = np.asarray(init_w, dtype=float), np.asarray(trained_w, dtype=float)
    shared = _symmetric(init_w, trained_w)
    diff = trained_w - init_w
    panels = ((init_w, "untrained", shared), (trained_w, "trained", shared),
              (diff, "trained - untrained", _symmetric(diff)))
    fig, axes = _figure(15, 5.4, 1, 3, left=0.2, right=0.2, top=0.75, bottom=0.45, wspace=0.4)
    for ax, (w, title, m) in zip(axes[0], panels):
        rgb = weights_rgb(w, m)
        ax.imshow(_tile(rgb, ncols=math.ceil(math.sqrt(len(rgb))), fill=1.0), interpolation="nearest")
        ax.set_title(f"{title} ({len(rgb)} filters, {rgb.shape[1]}x{rgb.shape[2]})")
        ax.set_xlabel(f"grey = 0, full colour = ±{m:.3g}", fontsize=8)
        _bare(ax)
    fig.suptitle("first conv layer filters (RGB; untrained and trained on one scale)",
                 y=1 - 0.08 / fig.get_figheight(), va="top")
    return fig


def filter_grid(init_w: np.ndarray, trained_w: np.ndarray, layer: str) -> Figure:
    """Conv weights (out, in, kh, kw): rows = output filters, columns = input channels, one
    kh x kw patch per cell. Untrained and trained on one colour scale symmetric about 0, so what
    training changed in size shows, then their difference (trained - untrained) on its own."""
    init_w, trained_w = np.asarray(init_w, dtype=float), np.asarray(trained_w, dtype=float)
    fig, axes = _figure(18, 6, 1, 3, left=0.7, right=0.25, top=0.4, bottom=0.65, wspace=0.9)
    shared = _symmetric(init_w, trained_w)
    diff = trained_w - init_w
    panels = ((init_w, "untrained", shared, "weight (shared scale)"), (trained_w, "trained", shared,
                                                                        "weight (shared scale)"),
              (diff, "trained - untrained", _symmetric(diff), "change"))
    for ax, (w, title, m, label) in zip(axes[0], panels):
        n_out, n_in, kh, kw = w.shape
        # One mosaic image per panel: (out, in) cells separated by NaN lines shown as background.
        grid = _tile(w.reshape(n_out * n_in, kh, kw), ncols=n_in, fill=np.nan)
        im = ax.imshow(grid, cmap=WEIGHT_CMAP, vmin=-m, vmax=m, interpolation="nearest")
        ax.set_title(f"{layer} {title}")
        ax.set_xticks([j * (kw + 1) + kw / 2 - 0.5 for j in range(n_in)], range(n_in), fontsize=6)
        ax.set_yticks([i * (kh + 1) + kh / 2 - 0.5 for i in range(n_out)], range(n_out), fontsize=6)
        ax.tick_params(length=0)
        ax.set_xlabel("input channel")
        ax.set_ylabel("output filter")
        fig.colorbar(im, ax=ax, shrink=0.8, label=label)
    return fig


def _symmetric(*arrays: np.ndarray) -> float:
    """The largest |value| of the arrays (1 where they are all zero or NaN): a scale symmetric about 0."""
    m = max((float(np.nanmax(np.abs(a))) for a in arrays if np.isfinite(a).any()), default=0.0)
    return m or 1.0


def feature_maps(images: np.ndarray, init_maps: np.ndarray, trained_maps: np.ndarray, layer: str,
                 classes: list[str], labels: np.ndarray) -> Figure:
    """Rows = probe images (at most 6): the image, then up to 8 channels of ``layer``'s output in
    the untrained and in the trained model; each map scaled to its own range."""
    p = min(6, len(images))
    c = min(8, init_maps.shape[1], trained_maps.shape[1])
    cells = [[_rgb(images[i])] + [_colour(maps[i, k]) for maps in (init_maps, trained_maps) for k in range(c)]
             for i in range(p)]
    names = [classes[int(labels[i])] for i in range(p)]
    # Wider gaps set the image column and the two models' blocks apart.
    fig, ax, xc, yc = _grid(cells, cell=0.7, title=f"feature maps of {layer} (each map scaled to its own range)",
                            left=_text_in(names, 7) + 0.15, top=0.75, col_gaps={0: 8, c: 10})
    ax.set_yticks(yc, names, fontsize=7)
    ax.set_xticks(xc, ["image"] + [f"ch {k}" for k in range(c)] * 2, fontsize=7)
    for side, name in enumerate(("untrained", "trained")):
        _header(ax, (xc[1 + side * c] + xc[c + side * c]) / 2, name)
    return fig


def through_layers(image: np.ndarray, maps: dict[str, np.ndarray]) -> Figure:
    """One image through every conv layer: one row per layer (in order), its first 8 channels."""
    c = min(8, max(m.shape[0] for m in maps.values()))
    # The image alone in the top row; below it one row per layer, named on the left; a layer with
    # fewer channels leaves its last cells empty.
    cells = [[_rgb(image)] + [None] * (c - 1)]
    cells += [[_colour(m[k]) if k < m.shape[0] else None for k in range(c)] for m in maps.values()]
    names = ["input"] + [f"{name}\n{m.shape[-2]}x{m.shape[-1]}" for name, m in maps.items()]
    gap = 16  # pixels under the image for the channel numbers
    fig, ax, xc, yc = _grid(cells, cell=0.8, title="one image through every conv layer",
                            left=_text_in(names, 7) + 0.15, top=0.4, row_gaps={0: gap})
    ax.set_yticks(yc, names, fontsize=7)
    first = yc[1] - (yc[1] - yc[0] - gap) / 2  # the top edge of the first layer's row
    for k in range(c):
        ax.text(xc[k], first - 3, f"ch {k}", ha="center", va="bottom", fontsize=7)
    return fig


def cam_overlays(images: np.ndarray, maps: dict[str, np.ndarray], labels: np.ndarray, preds: np.ndarray,
                 classes: list[str]) -> Figure:
    """Rows = probe images: the image, then one map overlay per method (maps (P, H, W) in [0, 1])."""
    methods = list(maps)
    cells = [[_rgb(img)] + [_blend(img, maps[m][i]) for m in methods] for i, img in enumerate(images)]
    # Two lines of "true: cat / pred: dog"; red marks a wrong prediction.
    truth = [(classes[int(labels[i])], classes[int(preds[i])]) for i in range(len(images))]
    names = [f"true: {t}\npred: {p}" for t, p in truth]
    fig, ax, xc, yc = _grid(cells, cell=1.0, title="class activation maps", left=_text_in(names, 7) + 0.15,
                            top=0.6, col_gaps={0: 6})
    ax.set_xticks(xc, ["image"] + methods, fontsize=8)
    ax.set_yticks(yc, names, fontsize=7)
    for text, (t, p) in zip(ax.get_yticklabels(), truth):
        text.set_color("black" if t == p else "tab:red")
    return fig


def faithfulness(x: np.ndarray, deletion: np.ndarray, insertion: np.ndarray,
                 deletion_random: np.ndarray | None = None, insertion_random: np.ndarray | None = None) -> Figure:
    """Deletion and insertion curves (P, S) over the share of pixels x (S,): mean over images with a
    +-1 std band, the random-map baseline dashed; the area under each mean curve in the legend."""
    x = np.asarray(x, dtype=float)
    fig, axes = _figure(10, 4, 1, 2, wspace=0.8)
    panels = (("deletion", deletion, deletion_random, "lower is better"),
              ("insertion", insertion, insertion_random, "higher is better"))
    for ax, (mode, main, random, better) in zip(axes[0], panels):
        for c, name, style, colour in ((main, "map", "-", "tab:blue"), (random, "random map", "--", "tab:gray")):
            if c is None:
                continue
            c = np.asarray(c, dtype=float)
            mean, std = c.mean(axis=0), c.std(axis=0)
            ax.fill_between(x, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color=colour, alpha=0.15, lw=0)
            ax.plot(x, mean, style, color=colour, label=f"{name} (AUC {_auc(x, mean):.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(f"share of pixels {'deleted' if mode == 'deletion' else 'inserted'}")
        ax.set_ylabel("probability of the target class")
        ax.set_title(f"{mode} ({better})")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def _auc(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoid area under y(x) (np.trapz / np.trapezoid differ between numpy versions)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum())


def sanity(layers: list[str], spearman: np.ndarray, maps: np.ndarray, image: np.ndarray) -> Figure:
    """Cascading randomization: mean Spearman correlation with the trained model's maps after
    each layer is randomized from the top (left), and one image's maps at every step (right)."""
    n = len(maps) + 1  # the image, the trained map, one map per step
    ncols = min(n, 7)
    nrows = math.ceil(n / ncols)
    strip = [_rgb(image)] + [_colour(m) for m in maps]
    titles = ["image"] + ["trained" if k == 0 else f"to {layers[k - 1]}" for k in range(len(maps))]
    gap = 16  # pixels above each row of maps for their titles
    curve_w = 4.5
    fig, ax, xc, yc = _grid([strip[r * ncols:(r + 1) * ncols] for r in range(nrows)], cell=1.1, title="",
                            left=curve_w + 0.2, top=0.1 + gap / DPI, row_gaps={r: gap for r in range(nrows - 1)},
                            min_size=(0, 3.8))
    tile = (yc[1] - yc[0] - gap) if nrows > 1 else ax.images[0].get_array().shape[0]
    for k, title in enumerate(titles):
        r, c = divmod(k, ncols)
        ax.text(xc[c], yc[r] - tile / 2 - 3, title, ha="center", va="bottom", fontsize=7)
    # The curve fills the left part, its rotated layer names below it.
    fw, fh = fig.get_size_inches()
    bottom = 0.45 + _text_in(layers, 7) * 0.87
    curve = fig.add_axes((0.75 / fw, bottom / fh, (curve_w - 1.0) / fw, (fh - bottom - 0.35) / fh))
    spearman = np.asarray(spearman, dtype=float)
    curve.plot(range(len(layers)), spearman, "o-")
    curve.axhline(0, color="gray", lw=0.8)
    curve.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
    low = np.nanmin(spearman, initial=0.0) if np.isfinite(spearman).any() else 0.0
    curve.set_ylim(min(-0.2, low - 0.05), 1.05)  # a strongly negative correlation stays in view
    curve.set_xlabel("randomized from the top down to")
    curve.set_ylabel("mean Spearman correlation")
    curve.set_title("cascading randomization")
    curve.grid(alpha=0.3)
    return fig


def tsne_gmm(embedding: np.ndarray, labels: np.ndarray, clusters: np.ndarray, classes: list[str],
             scores: dict[str, float] | None = None) -> Figure:
    """t-SNE of the feature vectors (N, 2) coloured by true label (left) and by GMM cluster (right)."""
    found = np.unique(clusters)
    names = [f"cluster {k}" for k in range(int(found.max()) + 1)]
    legend_w = 0.45 + _text_in(list(classes) + (names if len(found) <= 20 else []), 7)  # room for a legend
    fig, (axes,) = _figure(12, 5.5, 1, 2, left=0.1, right=legend_w, top=0.6, bottom=0.1, wspace=legend_w + 0.2)
    ax_l, ax_c = axes
    _scatter_by(ax_l, embedding, labels, classes)
    ax_l.set_title("t-SNE, coloured by true label")
    ax_l.legend(loc="center left", bbox_to_anchor=(1, 0.5), markerscale=4, fontsize=7, frameon=False)
    _scatter_by(ax_c, embedding, clusters, names)
    if len(found) <= 20:
        ax_c.legend(loc="center left", bbox_to_anchor=(1, 0.5), markerscale=4, fontsize=7, frameon=False)
    title = f"GMM clusters (k={len(found)})"
    if scores:
        title += "\n" + "  ".join(f"{k.upper() if len(k) <= 3 else k} {v:.3f}" for k, v in scores.items())
    ax_c.set_title(title)
    return fig


def bic(bic: np.ndarray, ks: list[int], covariance_types: list[str], best: tuple[int, str] | None = None,
        scored: tuple[int, str] | None = None, why: str = "") -> Figure:
    """BIC (types, ks) vs number of components per covariance type; the lowest BIC (``best``, by
    default found here) marked with a star. ``scored``: the (k, type) of the mixture whose clusters
    are shown and scored, said under the title with ``why`` that k, and ringed where it is not the
    lowest BIC."""
    b = np.asarray(bic, dtype=float)
    ks, covariance_types = list(ks), list(covariance_types)  # arrays read back from HDF5 have no .index
    if best is None and np.isfinite(b).any():
        i, j = np.unravel_index(np.nanargmin(b), b.shape)
        best = (ks[j], covariance_types[i])
    lines = ["Gaussian mixture model selection"]
    if scored is not None:
        lines += textwrap.wrap(f"scored: k={scored[0]}, {scored[1]}" + (f": {why}" if why else ""), 80)
    fig, ((ax,),) = _figure(7, 4.3 + 0.17 * len(lines), left=1.0, top=0.3 + 0.17 * len(lines))
    for t, row in zip(covariance_types, b):
        ok = np.isfinite(row)
        ax.plot(np.asarray(ks)[ok], row[ok], "o-", ms=3, label=t)
    if scored is not None and scored != best and scored[1] in covariance_types and scored[0] in ks:
        k, t = scored
        y = b[covariance_types.index(t), ks.index(k)]
        ax.plot([k], [y], "o", ms=14, mfc="none", mec="black", mew=1.5, zorder=3, label=f"scored: k={k}, {t}")
    if best is not None:
        k, t = best
        y = b[covariance_types.index(t), ks.index(k)]
        lowest = "lowest BIC" + (", not scored" if scored is not None and scored != best else "")
        ax.plot([k], [y], "*", ms=16, color="gold", mec="black", zorder=3, label=f"{lowest}: k={k}, {t}")
    ax.set_xlabel("number of components k")
    ax.set_ylabel("BIC (lower is better)")
    ax.set_title("\n".join(lines), fontsize=10 if len(lines) > 1 else None)
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend(title="covariance")
    return fig


def contingency(table: np.ndarray, classes: list[str]) -> Figure:
    """Cluster x class counts (k, n_classes) as a heatmap with the counts written in."""
    t = np.asarray(table)
    k = t.shape[0]
    rows = [f"cluster {i}" for i in range(k)]
    fig, ((ax,),) = _figure(8, min(MAX_HEIGHT, max(3.5, 0.38 * k + 1.6)), left=0.45 + _text_in(rows, 10),
                            right=0.35, bottom=0.4 + 0.71 * _text_in(classes, 10))
    im = ax.imshow(t, cmap=MAP_CMAP, aspect="auto")
    _annotate(ax, t, im)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), rows)
    ax.set_xlabel("true class")
    ax.set_ylabel("GMM cluster")
    ax.set_title("clusters vs classes (counts)")
    fig.colorbar(im, ax=ax, label="images", fraction=0.1, pad=0.03)
    return fig


def confusion(conf: np.ndarray, per_class_acc: np.ndarray, classes: list[str], ece: float | None = None,
              reliability: dict[str, np.ndarray] | None = None) -> Figure:
    """Confusion matrix (colour = share of the true class, text = counts), per-class accuracy and,
    given ``reliability`` (the bins of `interpret.metrics.reliability_bins`), the reliability diagram beside the ECE."""
    conf = np.asarray(conf)
    rows = conf.sum(axis=1, keepdims=True)
    share = conf / np.maximum(rows, 1)
    names = 0.71 * _text_in(classes, 10)  # the rotated class names under the first two panels
    ratios = [1.2, 1] + ([0.8] if reliability is not None else [])
    fig, (axes,) = _figure(12 + 4.4 * (reliability is not None), 5.5, 1, len(ratios),
                           left=0.45 + _text_in(classes, 10), top=0.7, bottom=0.45 + names, wspace=1.1,
                           width_ratios=ratios)
    ax_m, ax_b = axes[:2]
    im = ax_m.imshow(share, cmap="Blues", vmin=0, vmax=1)
    _annotate(ax_m, conf, im)
    n = len(classes)
    ax_m.set_xticks(range(n), classes, rotation=45, ha="right")
    ax_m.set_yticks(range(n), classes)
    ax_m.set_xlabel("predicted")
    ax_m.set_ylabel("true")
    ax_m.set_title("confusion matrix (colour: share of the true class)")
    fig.colorbar(im, ax=ax_m, shrink=0.8)
    acc = np.asarray(per_class_acc, dtype=float)
    ax_b.bar(range(n), acc, color="tab:blue")
    mean = float(np.nanmean(acc)) if np.isfinite(acc).any() else math.nan
    ax_b.axhline(mean, color="black", ls="--", lw=1)
    ax_b.set_xticks(range(n), classes, rotation=45, ha="right")
    ax_b.set_ylim(0, 1)
    ax_b.set_ylabel("accuracy")
    ax_b.set_title(f"per-class accuracy (dashed: mean {mean:.3f})")
    ax_b.grid(axis="y", alpha=0.3)
    if reliability is not None:
        _reliability(axes[2], reliability, ece)
    what = "confusion, per-class accuracy and calibration" if reliability is not None else \
        "confusion and per-class accuracy"
    fig.suptitle(what + (f" (ECE {ece:.3f})" if ece is not None else ""), y=1 - 0.08 / fig.get_figheight(), va="top")
    return fig


def _reliability(ax: Axes, r: dict[str, np.ndarray], ece: float | None) -> None:
    """Accuracy per confidence bin as bars, the gap to the bin's mean confidence hatched above or below
    them, the diagonal of perfect calibration, and the share of images in each bin as a step line."""
    edges = np.asarray(r["edges"], dtype=float)
    acc, conf = np.asarray(r["accuracy"], dtype=float), np.asarray(r["confidence"], dtype=float)
    count = np.asarray(r["count"], dtype=float)
    ok = count > 0
    left, width = edges[:-1][ok], np.diff(edges)[ok]
    ax.bar(left, acc[ok], width, align="edge", color="tab:blue", edgecolor="white", lw=0.5, label="accuracy")
    ax.bar(left, conf[ok] - acc[ok], width, bottom=acc[ok], align="edge", color="tab:red", alpha=0.25,
           hatch="//", edgecolor="tab:red", lw=0, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfectly calibrated")
    ax.stairs(count / max(count.sum(), 1), edges, color="black", lw=0.8, label="share of images")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence (softmax maximum)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability" + (f" (ECE {ece:.3f})" if ece is not None else ""))
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)


# ---------------------------------------------------------------- per sweep


def accuracy_bars(pivot: dict, chance: float | None = None) -> Figure:
    """Grouped bars of a results pivot: one group per variant, one bar per schedule, std as error
    bars; cells without a value are left out, cells with missing seeds say n/of, cells with a
    degenerate trial are marked with a dagger; ``chance`` (1 / classes) as a dashed line."""
    variants, schedules, cells = pivot["variants"], pivot["schedules"], pivot["cells"]
    fig, ((ax,),) = _figure(min(12, max(6, 0.35 * len(variants) * len(schedules) + 2.5)), 4.7, left=0.8, top=0.65)
    width = 0.8 / max(1, len(schedules))
    for j, s in enumerate(schedules):
        xs, ys, errs, notes = [], [], [], []
        for i, v in enumerate(variants):
            cell = cells.get(f"{v}|{s}")
            if cell is None or cell.get("mean") is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(cell["mean"])
            errs.append(cell.get("std") or 0.0)
            missing = cell.get("n") != cell.get("of")
            notes.append(f"{cell['mean']:.3f}" + ("†" if cell.get("degenerate") else "")
                         + (f"\n{cell.get('n')}/{cell.get('of')}" if missing else ""))
        if not xs:
            continue
        bars = ax.bar(xs, ys, width, yerr=errs, capsize=3, label=s)
        ax.bar_label(bars, notes, fontsize=6, padding=2)
    if chance is not None:
        ax.axhline(chance, color="gray", ls="--", lw=1, label=f"chance ({chance:g})")
    ax.set_xticks(range(len(variants)), variants)
    ax.set_xlabel("variant")
    ax.set_ylabel(pivot["metric"])
    ax.set_title(f"{pivot['metric']} by variant and learning-rate schedule\n(mean ± std over seeds)")
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="schedule", fontsize=8)
    if any(c.get("degenerate") for c in cells.values()):
        ax.text(1, -0.13, "† includes a degenerate trial", transform=ax.transAxes, ha="right", va="top",
                fontsize=7)
    return fig


def valid_curves(histories: dict[str, dict[str, np.ndarray]], variant_of: dict[str, str]) -> Figure:
    """Every trial's validation accuracy vs epoch, one colour per variant."""
    variants = list(dict.fromkeys(variant_of.get(t, "?") for t in histories))
    colour = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    fig, ((ax,),) = _figure(8, 5)
    for t, h in histories.items():
        e, y = np.asarray(h["epoch"], dtype=float), np.asarray(h["valid_acc"], dtype=float)
        ok = np.isfinite(e) & np.isfinite(y)
        ax.plot(e[ok], y[ok], color=colour[variant_of.get(t, "?")], alpha=0.7, lw=1.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend([Line2D([], [], color=colour[v]) for v in variants], variants, title="variant")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"validation accuracy of {len(histories)} trials")
    ax.grid(alpha=0.3)
    return fig


def cam_grid(images: np.ndarray, maps: list[np.ndarray | None] | np.ndarray, trial_ids: list[str],
             classes: list[str], labels: np.ndarray, targets: list[np.ndarray | None] | np.ndarray | None = None,
             method: str | None = None, groups: list[str] | None = None,
             why: dict[str, str] | None = None) -> Figure:
    """The same probe images' maps across trials: rows = images, the image then one overlay
    column per trial in the order given (maps (T, P, H, W) in [0, 1]). ``method`` names the maps in
    the title; ``targets`` (T, P), the class each map was computed for, is written in red under a
    tile where it is not the image's true class; ``groups`` (a name per trial, e.g. its variant)
    sets each run of columns of one name apart by a wider gap. A trial whose maps are None keeps its
    column, grey, with ``why[trial]`` written down it: the grid shows every trial it is given."""
    t, p = len(trial_ids), len(images)
    why = why or {}
    blank = np.full((*np.asarray(images[0]).shape[:2], 3), LEFT_OUT_GREY)
    cells = [[_rgb(img)] + [blank if maps[j] is None else _blend(img, maps[j][i]) for j in range(t)]
             for i, img in enumerate(images)]
    names = [classes[int(labels[i])] for i in range(p)]
    col_gaps = {0: 6}
    if groups is not None:
        col_gaps |= {j: 8 for j in range(1, t) if groups[j] != groups[j - 1]}
    under = 11 if targets is not None else 0  # pixels under each row for the target class
    title = f"{method or 'class activation'} maps across trials"
    if targets is not None:
        title += "\ntarget: the model's prediction (red: not the true class)"
    left_out = [j for j in range(t) if maps[j] is None]
    if left_out:
        title += f"\ngrey: {len(left_out)} of {t} trials have no maps (why: down the column)"
    # Trial ids are written vertically above their columns; the top margin fits the longest.
    fig, ax, xc, yc = _grid(cells, cell=0.9, title=title, left=_text_in(names, 7) + 0.15,
                            top=0.45 + 0.17 * ((targets is not None) + bool(left_out)) + _text_in(trial_ids, 6),
                            col_gaps=col_gaps, row_gaps={i: under for i in range(p - 1)} if under else None,
                            bottom=0.1 + under / DPI)
    ax.set_xticks(xc, ["image"] + list(trial_ids), fontsize=6, rotation=90)
    ax.get_xticklabels()[0].set(rotation=0, fontsize=7)
    ax.set_yticks(yc, names, fontsize=7)
    tile = 2 * yc[0] + 1
    for j in left_out:  # the reason down the grey column, in as many lines as its width holds
        chars = max(12, int(p * 0.9 * 72 / (0.62 * 6)) - 2)
        text = textwrap.wrap(f"no maps: {why.get(trial_ids[j], 'not interpreted')}", chars)
        ax.text(xc[1 + j], (yc[0] + yc[-1]) / 2, "\n".join(text[:3]), rotation=90, ha="center", va="center",
                fontsize=6, color="0.3")
    if targets is not None:
        for j in range(t):
            if targets[j] is None or maps[j] is None:
                continue
            for i in range(p):
                if int(targets[j][i]) != int(labels[i]):
                    ax.text(xc[1 + j], yc[i] + tile / 2, classes[int(targets[j][i])], ha="center", va="top",
                            fontsize=5, color="tab:red", clip_on=False)
    return fig


def tsne_grid(embeddings: list[np.ndarray | None], labels: list[np.ndarray | None], trial_ids: list[str],
              classes: list[str], rows: list[str] | None = None, why: dict[str, str] | None = None) -> Figure:
    """One small t-SNE scatter per trial coloured by label, one shared legend. With ``rows`` (a name
    per trial, e.g. its variant) one row of panels per name, trials in the order given (so a
    variant x schedule grid); else about 5 panels per row. A trial whose embedding is None gets a
    grey panel with its id and ``why[trial]``: the grid shows every trial it is given."""
    n = len(trial_ids)
    why = why or {}
    if rows is None:
        place = [divmod(k, min(5, n)) for k in range(n)]
    else:
        order = list(dict.fromkeys(rows))
        seen = [rows[:k].count(r) for k, r in enumerate(rows)]
        place = [(order.index(r), c) for r, c in zip(rows, seen)]
    nrows, ncols = max(r for r, _ in place) + 1, max(c for _, c in place) + 1
    legend_w = 0.5 + _text_in(classes, 7)
    cell = min(2.2, (MAX_HEIGHT - 1) / nrows, (MAX_WIDTH - legend_w - 0.2) / ncols)
    missing = sum(e is None for e in embeddings)
    fig, axes = _figure(cell * ncols + legend_w, cell * nrows + 0.5 + 0.17 * bool(missing), nrows, ncols, left=0.1,
                        right=legend_w, top=0.55 + 0.17 * bool(missing), bottom=0.1, wspace=0.1, hspace=0.3)
    for (r, c), e, y, tid in zip(place, embeddings, labels, trial_ids):
        ax = axes[r, c]
        if e is None:
            _bare(ax)
            ax.set_facecolor((LEFT_OUT_GREY,) * 3)
            chars = max(12, int(cell * 72 / (0.62 * 6)) - 2)
            text = textwrap.wrap(f"no t-SNE: {why.get(tid, 'not interpreted')}", chars)
            ax.text(0.5, 0.5, "\n".join(text[:max(1, int(cell * 8))]), transform=ax.transAxes, ha="center",
                    va="center", fontsize=6, color="0.3")
        else:
            _scatter_by(ax, e, y, classes, s=1)
        ax.set_title(tid, fontsize=7)
    for (r, c), ax in np.ndenumerate(axes):
        if (r, c) not in place:
            ax.remove()
    cmap = _group_cmap(len(classes))
    handles = [Line2D([], [], ls="", marker="o", ms=5, color=cmap(i % cmap.N)) for i in range(len(classes))]
    fig.legend(handles, classes, loc="center left", bbox_to_anchor=(1 - (legend_w - 0.1) / fig.get_figwidth(), 0.5),
               fontsize=7, frameon=False)
    title = "t-SNE of the test-set feature vectors, coloured by true label"
    if missing:
        title += f"\ngrey: {missing} of {n} trials have no embedding (why: in the panel)"
    fig.suptitle(title, y=1 - 0.08 / fig.get_figheight(), va="top", fontsize=10 if missing else None)
    return fig


# ---------------------------------------------------------------- helpers


def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1, left: float = 0.75, right: float = 0.2,
            top: float = 0.45, bottom: float = 0.6, wspace: float = 0.0, hspace: float = 0.0,
            **kw) -> tuple[Figure, np.ndarray]:
    """A ``width`` x ``height`` inch figure (capped) with an ``nrows`` x ``ncols`` grid of Axes
    (returned as a 2-D array), placed by fixed margins and gaps in inches. Constrained layout
    measured every label and made savefig draw each figure once more: most of a simple figure's
    time. ``kw`` goes to ``Figure.subplots`` (width_ratios, ...)."""
    w, h = min(width, MAX_WIDTH), min(height, MAX_HEIGHT)
    fig = Figure(figsize=(w, h), dpi=DPI)
    aw = max(1e-3, (w - left - right - (ncols - 1) * wspace) / ncols)  # mean Axes size, inches
    ah = max(1e-3, (h - top - bottom - (nrows - 1) * hspace) / nrows)
    fig.subplots_adjust(left=left / w, right=1 - right / w, top=1 - top / h, bottom=bottom / h,
                        wspace=wspace / aw, hspace=hspace / ah)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _bare(ax: Axes) -> None:
    """No ticks or frame, but keep the title and axis labels."""
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _norm01(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    lo, hi = np.nanmin(a), np.nanmax(a)
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _rgb(image: np.ndarray) -> np.ndarray:
    """An image as float RGB in [0, 1], as imshow reads it: integers out of 255, floats clipped."""
    a = np.asarray(image)
    a = a / 255.0 if a.dtype.kind in "ui" else np.clip(a.astype(float), 0, 1)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return a[..., :3]


def _colour(m: np.ndarray) -> np.ndarray:
    """A map scaled to its own range (maps of different layers and models differ in scale) in
    MAP_CMAP, as RGB; NaN is left white."""
    n = _norm01(m)
    rgb = matplotlib.colormaps[MAP_CMAP](n)[..., :3]
    return np.where(np.isnan(n)[..., None], 1.0, rgb)


def _blend(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """``cam`` (values in [0, 1]) in CAM_CMAP at CAM_ALPHA over ``image``, as RGB: what drawing the
    map over the image with that alpha shows. A map of another resolution is stretched over the
    image (nearest); values outside [0, 1] get the end colours, NaN leaves the image bare."""
    img, cam = _rgb(image), np.asarray(cam, dtype=float)
    shape = (max(img.shape[0], cam.shape[0]), max(img.shape[1], cam.shape[1]))
    heat = matplotlib.colormaps[CAM_CMAP](_resize(cam, shape))
    alpha = CAM_ALPHA * heat[..., 3:]
    return _resize(img, shape) * (1 - alpha) + heat[..., :3] * alpha


def _resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of the first two axes to ``shape`` (an integer zoom repeats pixels)."""
    h, w = a.shape[:2]
    if (h, w) == tuple(shape):
        return a
    return a[(np.arange(shape[0]) * h // shape[0])[:, None], np.arange(shape[1]) * w // shape[1]]


def _grid(cells: list[list[np.ndarray | None]], cell: float, title: str, left: float, top: float,
          right: float = 0.1, bottom: float = 0.1, col_gaps: dict[int, int] | None = None,
          row_gaps: dict[int, int] | None = None, min_size: tuple[float, float] = (2.0, 2.0),
          ) -> tuple[Figure, Axes, np.ndarray, np.ndarray]:
    """A figure showing ``cells`` (rows of RGB arrays in [0, 1]; None leaves a cell white) as ONE
    mosaic image on one Axes: a few hundred Axes of one image each take seconds to build and draw.

    Every cell is resampled (nearest) to the same tile, an integer zoom of the largest cell, about
    ``cell`` inches wide (less where the figure would pass the size cap), with GUTTER white pixels
    between tiles (``col_gaps`` / ``row_gaps``: wider gaps after some columns / rows, in pixels).
    When it fits, a mosaic pixel is one pixel of the PNG, so tiles stay sharp. Margins (inches) hold
    the labels, which callers put as tick labels or texts in mosaic pixel coordinates. Returns the
    figure, the Axes and the tile centres: x per column, y per row."""
    nrows, ncols = len(cells), max(len(r) for r in cells)
    shapes = [c.shape[:2] for r in cells for c in r if c is not None]
    rh, rw = max(s[0] for s in shapes), max(s[1] for s in shapes)
    gx, gy = np.full(max(ncols - 1, 0), GUTTER), np.full(max(nrows - 1, 0), GUTTER)
    for gaps, given in ((gx, col_gaps), (gy, row_gaps)):
        for i, g in (given or {}).items():
            gaps[i] = g
    left, top, right, bottom = (round(v, 2) for v in (left, top, right, bottom))  # whole pixels
    room_w, room_h = (MAX_WIDTH - left - right) * DPI, (MAX_HEIGHT - top - bottom) * DPI

    def size(k: int) -> tuple[int, int]:
        return ncols * k * rw + int(gx.sum()), nrows * k * rh + int(gy.sum())

    want = max(1, round(cell * DPI / max(rh, rw)))
    k = want
    while k > 1 and (size(k)[0] > room_w or size(k)[1] > room_h):
        k -= 1
    w, h = size(k)
    scale = min(want / k, room_w / w, room_h / h)  # 1 unless the cap forced a smaller zoom
    th, tw = k * rh, k * rw
    x0 = np.concatenate([[0], np.cumsum(tw + gx)]).astype(int)
    y0 = np.concatenate([[0], np.cumsum(th + gy)]).astype(int)
    mosaic = np.full((h, w, 3), 255, dtype=np.uint8)
    for i, row in enumerate(cells):
        for j, c in enumerate(row):
            if c is not None:
                tile = (np.clip(c, 0, 1) * 255 + 0.5).astype(np.uint8)
                mosaic[y0[i]:y0[i] + th, x0[j]:x0[j] + tw] = _resize(tile, (th, tw))

    aw, ah = w * scale / DPI, h * scale / DPI
    # Below the minimum size, the mosaic is centred in the extra room (in whole pixels, to stay 1:1).
    extra_w = math.ceil(max(0.0, min_size[0] - (left + aw + right)) * DPI)
    extra_h = math.ceil(max(0.0, min_size[1] - (top + ah + bottom)) * DPI)
    left, right = left + extra_w // 2 / DPI, right + (extra_w - extra_w // 2) / DPI
    top, bottom = top + extra_h // 2 / DPI, bottom + (extra_h - extra_h // 2) / DPI
    fw, fh = left + aw + right, top + ah + bottom
    fig = Figure(figsize=(fw, fh), dpi=DPI)
    ax = fig.add_axes((left / fw, 1 - (top + ah) / fh, aw / fw, ah / fh))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_frame_on(False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.tick_params(length=0, pad=2, top=False, bottom=False, labeltop=True, labelbottom=False)
    if title:
        fig.suptitle(title, y=1 - 0.08 / fh, va="top", fontsize=10)
    return fig, ax, x0 + (tw - 1) / 2, y0 + (th - 1) / 2


def _text_in(labels: list[str], fontsize: float) -> float:
    """About how many inches the longest line of ``labels`` takes in ``fontsize`` points (the
    fixed layouts reserve room for labels by this, not by measuring them)."""
    n = max((len(line) for s in labels for line in str(s).split("\n")), default=0)
    return n * 0.62 * fontsize / 72


def _header(ax: Axes, x: float, text: str) -> None:
    """A heading over a block of columns, above the column tick labels."""
    ax.annotate(text, (x, 1), xycoords=ax.get_xaxis_transform(), xytext=(0, 13), textcoords="offset points",
                ha="center", va="bottom", fontsize=8)


def _tile(patches: np.ndarray, ncols: int, fill: float) -> np.ndarray:
    """(n, h, w[, c]) patches into one mosaic, ``ncols`` per row, one ``fill`` pixel between them."""
    n, h, w = patches.shape[:3]
    nrows = math.ceil(n / ncols)
    out = np.full((nrows * (h + 1) - 1, ncols * (w + 1) - 1, *patches.shape[3:]), fill, dtype=float)
    for k, p in enumerate(patches):
        r, c = divmod(k, ncols)
        out[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = p
    return out


def _scatter_by(ax: Axes, xy: np.ndarray, groups: np.ndarray, names: list[str], s: float = 2) -> None:
    """One rasterized scatter per group, so the legend names groups; vector output stays small."""
    xy, groups = np.asarray(xy), np.asarray(groups)
    cmap = _group_cmap(len(names))
    for g in np.unique(groups):
        sel = groups == g
        ax.scatter(xy[sel, 0], xy[sel, 1], s=s, color=cmap(int(g) % cmap.N), label=names[int(g)],
                   rasterized=True, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")


def _group_cmap(n: int) -> Colormap:
    return matplotlib.colormaps["tab10" if n <= 10 else "tab20"]


def _annotate(ax: Axes, counts: np.ndarray, im: AxesImage) -> None:
    """Write each cell's count over heatmap ``im``, white where the cell's colour is dark."""
    rgba = im.to_rgba(im.get_array())
    dark = rgba[..., :3] @ np.array([0.299, 0.587, 0.114]) < 0.5
    for (i, j), v in np.ndenumerate(counts):
        ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=7, color="white" if dark[i, j] else "black")
