"""Figures from arrays: numpy arrays and plain dicts in, matplotlib figures out.

Drawing only (no torch, h5py or ray): every function returns a `Figure` that needs no pyplot
state, and `save` writes it as a PNG atomically and releases it, so a post-processing run that
draws hundreds of figures does not grow in memory.
"""

from __future__ import annotations

import math
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

DPI = 100
MAP_CMAP = "viridis"
WEIGHT_CMAP = "coolwarm"
CAM_CMAP = "jet"
CAM_ALPHA = 0.5
MAX_WIDTH = 24.0   # inches; only the many-trial grids get near it
MAX_HEIGHT = 18.0


def save(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically, then release the figure; returns the path."""
    # checkpoint imports torch, which drawing must not need: load it only when a file is written.
    from vgg_xai.checkpoint import atomic_write_bytes

    path = Path(path)
    try:
        # The temporary name ends in ".tmpPID", so the format cannot come from the suffix.
        atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)  # a no-op unless the caller made the figure with pyplot
        fig.clear()
    return path


# ---------------------------------------------------------------- per trial


def curves(history: dict[str, np.ndarray]) -> Figure:
    """Loss and accuracy vs epoch, train and valid; non-finite points (a diverged epoch) are left out."""
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    epoch = np.asarray(history["epoch"], dtype=float)
    for ax, what in zip(axes, ("loss", "acc")):
        for split, style in (("train", "o-"), ("valid", "s--")):
            y = np.asarray(history[f"{split}_{what}"], dtype=float)
            ok = np.isfinite(y) & np.isfinite(epoch)
            ax.plot(epoch[ok], y[ok], style, ms=3, label=split)
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
    fig = _figure(3 * ncols, 2.4 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
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
    fig.legend(handles, labels, loc="outside upper right", ncols=2)
    fig.suptitle("activations before and after BatchNorm")
    return fig


def filters_rgb(init_rgb: np.ndarray, trained_rgb: np.ndarray) -> Figure:
    """First-layer filters (out, kh, kw, 3) in [0, 1] as RGB patches, untrained beside trained."""
    fig = _figure(10, 5.4)
    for ax, w, title in zip(fig.subplots(1, 2), (init_rgb, trained_rgb), ("untrained", "trained")):
        w = np.clip(np.asarray(w, dtype=float), 0, 1)
        ax.imshow(_tile(w, ncols=math.ceil(math.sqrt(len(w))), fill=1.0), interpolation="nearest")
        ax.set_title(f"{title} ({len(w)} filters, {w.shape[1]}x{w.shape[2]})")
        _bare(ax)
    fig.suptitle("first conv layer filters (RGB)")
    return fig


def filter_grid(init_w: np.ndarray, trained_w: np.ndarray, layer: str) -> Figure:
    """Conv weights (out, in, kh, kw): rows = output filters, columns = input channels, one
    kh x kw patch per cell; untrained beside trained, each side on its own scale symmetric about 0."""
    fig = _figure(12, 6)
    for ax, w, title in zip(fig.subplots(1, 2), (init_w, trained_w), ("untrained", "trained")):
        w = np.asarray(w, dtype=float)
        n_out, n_in, kh, kw = w.shape
        # One mosaic image per side: (out, in) cells separated by NaN lines shown as background.
        grid = _tile(w.reshape(n_out * n_in, kh, kw), ncols=n_in, fill=np.nan)
        m = float(np.nanmax(np.abs(w))) or 1.0
        im = ax.imshow(grid, cmap=WEIGHT_CMAP, vmin=-m, vmax=m, interpolation="nearest")
        ax.set_title(f"{layer} {title}")
        ax.set_xticks([j * (kw + 1) + kw / 2 - 0.5 for j in range(n_in)], range(n_in), fontsize=6)
        ax.set_yticks([i * (kh + 1) + kh / 2 - 0.5 for i in range(n_out)], range(n_out), fontsize=6)
        ax.tick_params(length=0)
        ax.set_xlabel("input channel")
        ax.set_ylabel("output filter")
        fig.colorbar(im, ax=ax, shrink=0.8, label="weight")
    return fig


def feature_maps(images: np.ndarray, init_maps: np.ndarray, trained_maps: np.ndarray, layer: str,
                 classes: list[str], labels: np.ndarray) -> Figure:
    """Rows = probe images (at most 6): the image, then up to 8 channels of ``layer``'s output in
    the untrained and in the trained model; each map scaled to its own range."""
    p = min(6, len(images))
    c = min(8, init_maps.shape[1], trained_maps.shape[1])
    fig, axes = _image_grid(p, 1 + 2 * c, cell=0.7, title=f"feature maps of {layer} (each map scaled to its own range)")
    for i in range(p):
        _show_image(axes[i, 0], images[i])
        axes[i, 0].set_ylabel(classes[int(labels[i])], fontsize=7)
        for side, maps in enumerate((init_maps, trained_maps)):
            for k in range(c):
                ax = axes[i, 1 + side * c + k]
                _show_map(ax, maps[i, k])
                if i == 0:
                    ax.set_title(f"{'untrained' if side == 0 else 'trained'}\nch {k}", fontsize=6)
    return fig


def through_layers(image: np.ndarray, maps: dict[str, np.ndarray]) -> Figure:
    """One image through every conv layer: one row per layer (in order), its first 8 channels."""
    c = min(8, max(m.shape[0] for m in maps.values()))
    # The image alone in the top row; below it one row per layer, named in the first column.
    fig, axes = _image_grid(1 + len(maps), 1 + c, cell=0.8, title="one image through every conv layer")
    _show_image(axes[0, 0], image)
    axes[0, 0].set_title("input", fontsize=7)
    for ax in axes[0, 1:]:
        ax.set_visible(False)
    for i, (name, m) in enumerate(maps.items(), start=1):
        axes[i, 0].text(0.5, 0.5, f"{name}\n{m.shape[-2]}x{m.shape[-1]}", ha="center", va="center", fontsize=7,
                        transform=axes[i, 0].transAxes)
        for k in range(c):
            ax = axes[i, 1 + k]
            if k < m.shape[0]:
                _show_map(ax, m[k])
            else:
                ax.set_visible(False)
            if i == 1:
                ax.set_title(f"ch {k}", fontsize=7)
    return fig


def cam_overlays(images: np.ndarray, maps: dict[str, np.ndarray], labels: np.ndarray, preds: np.ndarray,
                 classes: list[str]) -> Figure:
    """Rows = probe images: the image, then one map overlay per method (maps (P, H, W) in [0, 1])."""
    methods = list(maps)
    fig, axes = _image_grid(len(images), 1 + len(methods), cell=1.0, title="class activation maps", label_w=0.9)
    for i, img in enumerate(images):
        true, pred = classes[int(labels[i])], classes[int(preds[i])]
        _show_image(axes[i, 0], img)
        # Two lines of "true: cat / pred: dog"; red marks a wrong prediction.
        axes[i, 0].set_ylabel(f"true: {true}\npred: {pred}", fontsize=7, rotation=0, ha="right", va="center",
                              color="black" if true == pred else "tab:red")
        for j, m in enumerate(methods):
            _overlay(axes[i, 1 + j], img, maps[m][i])
    axes[0, 0].set_title("image", fontsize=8)
    for j, m in enumerate(methods):
        axes[0, 1 + j].set_title(m, fontsize=8)
    return fig


def faithfulness(x: np.ndarray, deletion: np.ndarray, insertion: np.ndarray,
                 deletion_random: np.ndarray | None = None, insertion_random: np.ndarray | None = None) -> Figure:
    """Deletion and insertion curves (P, S) over the share of pixels x (S,): mean over images with a
    +-1 std band, the random-map baseline dashed; the area under each mean curve in the legend."""
    x = np.asarray(x, dtype=float)
    fig = _figure(10, 4)
    panels = (("deletion", deletion, deletion_random, "lower is better"),
              ("insertion", insertion, insertion_random, "higher is better"))
    for ax, (mode, main, random, better) in zip(fig.subplots(1, 2), panels):
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
    fig = _figure(4.5 + 1.1 * ncols, max(3.8, 1.3 * nrows + 0.6))
    left, right = fig.subfigures(1, 2, width_ratios=[4.5, 1.1 * ncols])
    ax = left.subplots()
    ax.plot(range(len(layers)), spearman, "o-")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(-0.2, 1.05)
    ax.set_xlabel("randomized from the top down to")
    ax.set_ylabel("mean Spearman correlation")
    ax.set_title("cascading randomization")
    ax.grid(alpha=0.3)
    axes = right.subplots(nrows, ncols, squeeze=False).ravel()
    _show_image(axes[0], image)
    axes[0].set_title("image", fontsize=7)
    for k, m in enumerate(maps):
        ax = axes[1 + k]
        _show_map(ax, m)
        ax.set_title("trained" if k == 0 else f"to {layers[k - 1]}", fontsize=7)
    for ax in axes:
        _bare(ax)
    for ax in axes[n:]:
        ax.remove()
    return fig


def tsne_gmm(embedding: np.ndarray, labels: np.ndarray, clusters: np.ndarray, classes: list[str],
             scores: dict[str, float] | None = None) -> Figure:
    """t-SNE of the feature vectors (N, 2) coloured by true label (left) and by GMM cluster (right)."""
    fig = _figure(12, 5.5)
    ax_l, ax_c = fig.subplots(1, 2)
    _scatter_by(ax_l, embedding, labels, classes)
    ax_l.set_title("t-SNE, coloured by true label")
    ax_l.legend(loc="center left", bbox_to_anchor=(1, 0.5), markerscale=4, fontsize=7, frameon=False)
    found = np.unique(clusters)
    _scatter_by(ax_c, embedding, clusters, [f"cluster {k}" for k in range(int(found.max()) + 1)])
    if len(found) <= 20:
        ax_c.legend(loc="center left", bbox_to_anchor=(1, 0.5), markerscale=4, fontsize=7, frameon=False)
    title = f"GMM clusters (k={len(found)})"
    if scores:
        title += "\n" + "  ".join(f"{k.upper() if len(k) <= 3 else k} {v:.3f}" for k, v in scores.items())
    ax_c.set_title(title)
    return fig


def bic(bic: np.ndarray, ks: list[int], covariance_types: list[str], best: tuple[int, str] | None = None) -> Figure:
    """BIC (types, ks) vs number of components per covariance type; the best fit (default: the
    lowest BIC) marked with a star."""
    b = np.asarray(bic, dtype=float)
    ks, covariance_types = list(ks), list(covariance_types)  # arrays read back from HDF5 have no .index
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    for t, row in zip(covariance_types, b):
        ok = np.isfinite(row)
        ax.plot(np.asarray(ks)[ok], row[ok], "o-", ms=3, label=t)
    if best is None and np.isfinite(b).any():
        i, j = np.unravel_index(np.nanargmin(b), b.shape)
        best = (ks[j], covariance_types[i])
    if best is not None:
        k, t = best
        y = b[covariance_types.index(t), ks.index(k)]
        ax.plot([k], [y], "*", ms=16, color="gold", mec="black", zorder=3, label=f"best: k={k}, {t}")
    ax.set_xlabel("number of components k")
    ax.set_ylabel("BIC (lower is better)")
    ax.set_title("Gaussian mixture model selection")
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend(title="covariance")
    return fig


def contingency(table: np.ndarray, classes: list[str]) -> Figure:
    """Cluster x class counts (k, n_classes) as a heatmap with the counts written in."""
    t = np.asarray(table)
    k = t.shape[0]
    fig = _figure(8, min(MAX_HEIGHT, max(3.5, 0.38 * k + 1.6)))
    ax = fig.subplots()
    im = ax.imshow(t, cmap=MAP_CMAP, aspect="auto")
    _annotate(ax, t, im)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), [f"cluster {i}" for i in range(k)])
    ax.set_xlabel("true class")
    ax.set_ylabel("GMM cluster")
    ax.set_title("clusters vs classes (counts)")
    fig.colorbar(im, ax=ax, label="images")
    return fig


def confusion(conf: np.ndarray, per_class_acc: np.ndarray, classes: list[str], ece: float | None = None) -> Figure:
    """Confusion matrix (colour = share of the true class, text = counts) and per-class accuracy."""
    conf = np.asarray(conf)
    rows = conf.sum(axis=1, keepdims=True)
    share = conf / np.maximum(rows, 1)
    fig = _figure(12, 5.5)
    ax_m, ax_b = fig.subplots(1, 2, width_ratios=[1.2, 1])
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
    mean = float(np.nanmean(acc))
    ax_b.axhline(mean, color="black", ls="--", lw=1)
    ax_b.set_xticks(range(n), classes, rotation=45, ha="right")
    ax_b.set_ylim(0, 1)
    ax_b.set_ylabel("accuracy")
    ax_b.set_title(f"per-class accuracy (dashed: mean {mean:.3f})")
    ax_b.grid(axis="y", alpha=0.3)
    fig.suptitle("confusion and per-class accuracy" + (f" (ECE {ece:.3f})" if ece is not None else ""))
    return fig


# ---------------------------------------------------------------- per sweep


def accuracy_bars(pivot: dict) -> Figure:
    """Grouped bars of a results pivot: one group per variant, one bar per schedule, std as error
    bars; cells without a value are left out, cells with missing seeds say n/of."""
    variants, schedules, cells = pivot["variants"], pivot["schedules"], pivot["cells"]
    fig = _figure(min(12, max(6, 0.35 * len(variants) * len(schedules) + 2.5)), 4.5)
    ax = fig.subplots()
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
            notes.append(f"{cell['mean']:.3f}" + (f"\n{cell.get('n')}/{cell.get('of')}" if missing else ""))
        if not xs:
            continue
        bars = ax.bar(xs, ys, width, yerr=errs, capsize=3, label=s)
        ax.bar_label(bars, notes, fontsize=6, padding=2)
    ax.set_xticks(range(len(variants)), variants)
    ax.set_xlabel("variant")
    ax.set_ylabel(pivot["metric"])
    ax.set_title(f"{pivot['metric']} by variant and learning-rate schedule (mean ± std over seeds)")
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="schedule", fontsize=8)
    return fig


def valid_curves(histories: dict[str, dict[str, np.ndarray]], variant_of: dict[str, str]) -> Figure:
    """Every trial's validation accuracy vs epoch, one colour per variant."""
    variants = list(dict.fromkeys(variant_of.get(t, "?") for t in histories))
    colour = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    fig = _figure(8, 5)
    ax = fig.subplots()
    for t, h in histories.items():
        e, y = np.asarray(h["epoch"], dtype=float), np.asarray(h["valid_acc"], dtype=float)
        ok = np.isfinite(e) & np.isfinite(y)
        ax.plot(e[ok], y[ok], color=colour[variant_of.get(t, "?")], alpha=0.7, lw=1.2)
    ax.legend([Line2D([], [], color=colour[v]) for v in variants], variants, title="variant")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"validation accuracy of {len(histories)} trials")
    ax.grid(alpha=0.3)
    return fig


def cam_grid(images: np.ndarray, maps: np.ndarray, trial_ids: list[str], classes: list[str],
             labels: np.ndarray) -> Figure:
    """The same probe images' maps across trials: rows = images, the image then one overlay
    column per trial (maps (T, P, H, W) in [0, 1])."""
    t, p = len(trial_ids), len(images)
    # Trial ids are written vertically above their columns; the top margin fits the longest.
    top = 0.5 + 0.045 * max((len(s) for s in trial_ids), default=0)
    fig, axes = _image_grid(p, 1 + t, cell=0.9, title="class activation maps across trials", top=top)
    for i, img in enumerate(images):
        _show_image(axes[i, 0], img)
        axes[i, 0].set_ylabel(classes[int(labels[i])], fontsize=7)
        for j in range(t):
            _overlay(axes[i, 1 + j], img, maps[j][i])
    axes[0, 0].set_title("image", fontsize=7)
    for j, tid in enumerate(trial_ids):
        axes[0, 1 + j].set_title(tid, fontsize=6, rotation=90, va="bottom")
    return fig


def tsne_grid(embeddings: list[np.ndarray], labels: list[np.ndarray], trial_ids: list[str],
              classes: list[str]) -> Figure:
    """One small t-SNE scatter per trial coloured by label, about 5 per row, one shared legend."""
    n = len(trial_ids)
    ncols = min(5, n)
    nrows = math.ceil(n / ncols)
    cell = min(2.2, (MAX_HEIGHT - 1) / nrows)
    fig = _figure(cell * ncols + 1.6, cell * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, e, y, tid in zip(axes, embeddings, labels, trial_ids):
        _scatter_by(ax, e, y, classes, s=1)
        ax.set_title(tid, fontsize=7)
    for ax in axes[n:]:
        ax.remove()
    cmap = _group_cmap(len(classes))
    handles = [Line2D([], [], ls="", marker="o", ms=5, color=cmap(i % cmap.N)) for i in range(len(classes))]
    fig.legend(handles, classes, loc="outside right center", fontsize=7, frameon=False)
    fig.suptitle("t-SNE of the test-set feature vectors, coloured by true label")
    return fig


# ---------------------------------------------------------------- helpers


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(min(width, MAX_WIDTH), min(height, MAX_HEIGHT)), dpi=DPI, layout="constrained")


def _image_grid(nrows: int, ncols: int, cell: float, title: str, top: float = 0.55,
                label_w: float = 0.35) -> tuple[Figure, np.ndarray]:
    """A grid of square image cells, ``cell`` inches each (less when it would pass the size cap),
    placed by hand: constrained layout takes seconds on a few hundred axes and adds nothing here."""
    pad = 0.06
    cell = min(cell, (MAX_WIDTH - label_w) / ncols - pad, (MAX_HEIGHT - top) / nrows - pad)
    w, h = label_w + ncols * (cell + pad), top + nrows * (cell + pad) + 0.05
    fig = Figure(figsize=(w, h), dpi=DPI)
    fig.subplots_adjust(left=label_w / w, right=1 - pad / w, top=1 - top / h, bottom=0.05 / h,
                        wspace=pad / cell, hspace=pad / cell)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel():
        _bare(ax)
    fig.suptitle(title, y=1 - 0.08 / h, va="top", fontsize=10)
    return fig, axes


def _bare(ax: Axes) -> None:
    """No ticks or frame, but keep the axis labels (the row titles live there)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _norm01(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    lo, hi = np.nanmin(a), np.nanmax(a)
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _tile(patches: np.ndarray, ncols: int, fill: float) -> np.ndarray:
    """(n, h, w[, c]) patches into one mosaic, ``ncols`` per row, one ``fill`` pixel between them."""
    n, h, w = patches.shape[:3]
    nrows = math.ceil(n / ncols)
    out = np.full((nrows * (h + 1) - 1, ncols * (w + 1) - 1, *patches.shape[3:]), fill, dtype=float)
    for k, p in enumerate(patches):
        r, c = divmod(k, ncols)
        out[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = p
    return out


def _show_image(ax: Axes, image: np.ndarray) -> None:
    # Nearest keeps the real pixels of a 32x32 image and makes the PNG half the size of smoothing.
    ax.imshow(image, interpolation="nearest")


def _show_map(ax: Axes, m: np.ndarray) -> None:
    """A map scaled to its own range (maps of different layers and models differ in scale)."""
    ax.imshow(_norm01(m), cmap=MAP_CMAP, vmin=0, vmax=1, interpolation="nearest")


def _overlay(ax: Axes, image: np.ndarray, cam: np.ndarray) -> None:
    h, w = image.shape[:2]
    _show_image(ax, image)
    # The extent stretches a map of another resolution over the image.
    ax.imshow(cam, cmap=CAM_CMAP, alpha=CAM_ALPHA, vmin=0, vmax=1, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
              interpolation="nearest")


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
