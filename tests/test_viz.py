from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref

import matplotlib
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from vgg_xai import viz
from vgg_xai.interpret.metrics import reliability_bins

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def images(p: int, size: int = 8) -> np.ndarray:
    return rng().integers(0, 256, (p, size, size, 3), dtype=np.uint8)


def history(epochs: int = 5, diverged: bool = False) -> dict[str, np.ndarray]:
    e = np.arange(1, epochs + 1, dtype=float)
    h = {"epoch": e, "train_loss": 2 / e, "valid_loss": 2.2 / e, "train_acc": 1 - 1 / (e + 1),
         "valid_acc": 1 - 1.2 / (e + 1)}
    if diverged:
        h["valid_loss"][-1], h["valid_acc"][-1], h["train_loss"][-1] = np.nan, np.nan, np.inf
    return h


def hist(scale: float) -> dict[str, np.ndarray]:
    counts, edges = np.histogram(rng().normal(0, scale, 500), bins=20)
    return {"counts": counts, "edges": edges}


def image_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.images and ax.get_visible()]


def mosaic_axes(fig: Figure):
    """The one Axes of an image-grid figure: every tile is in its single image."""
    (ax,) = image_axes(fig)
    assert len(ax.images) == 1
    return ax


def texts(labels) -> list[str]:
    return [t.get_text() for t in labels]


def cut(ax, xs=None, ys=None) -> list[list[np.ndarray]]:
    """The mosaic on ``ax`` cut into its square tiles, centred at ``xs`` (columns) and ``ys`` (rows),
    by default the tick positions. The first tile starts at pixel 0, which gives the tile size."""
    m = ax.images[0].get_array()
    xs = ax.get_xticks() if xs is None else np.asarray(xs)
    ys = ax.get_yticks() if ys is None else np.asarray(ys)
    t = int(round(2 * xs[0] + 1))
    assert t > 1 and round(2 * ys[0] + 1) == t
    corner = lambda c: int(round(c - (t - 1) / 2))  # noqa: E731
    tiles = [[m[corner(y):corner(y) + t, corner(x):corner(x) + t] for x in xs] for y in ys]
    assert all(tile.shape[:2] == (t, t) for row in tiles for tile in row)
    return tiles


def as_tile(rgb: np.ndarray, t: int) -> np.ndarray:
    """What a tile of ``t`` pixels shows for float RGB ``rgb``: each pixel repeated, as 8 bits."""
    k = t // rgb.shape[0]
    assert k * rgb.shape[0] == t and k * rgb.shape[1] == t  # an integer zoom
    return np.round(np.clip(rgb, 0, 1) * 255).astype(int).repeat(k, axis=0).repeat(k, axis=1)


def viridis(m: np.ndarray) -> np.ndarray:
    return matplotlib.colormaps["viridis"](m)[..., :3]


def own_range(m: np.ndarray) -> np.ndarray:
    return (m - m.min()) / np.ptp(m)


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The map drawn in jet at alpha 0.5 over the image."""
    return 0.5 * image / 255 + 0.5 * matplotlib.colormaps["jet"](cam)[..., :3]


def white(tile: np.ndarray) -> bool:
    return bool((tile == 255).all())


def legend_texts(legend) -> list[str]:
    return [t.get_text() for t in legend.get_texts()]


def pivot() -> dict:
    cell = lambda m, n=3: {"mean": m, "std": None if m is None else 0.01, "n": n, "of": 3,  # noqa: E731
                           "statuses": ["ok"] * n}
    return {"metric": "test_acc", "variants": ["plain", "bn", "l2"], "schedules": ["lr1e-3", "lr1e-2"],
            "cells": {"plain|lr1e-3": cell(0.7), "plain|lr1e-2": cell(0.6), "bn|lr1e-3": cell(0.8, 2),
                      "bn|lr1e-2": cell(0.75), "l2|lr1e-3": cell(0.72), "l2|lr1e-2": cell(None, 0)}}


# One small call of every drawing function, for the checks that hold for all of them.
BUILDERS = {
    "curves": lambda: viz.curves(history(diverged=True)),
    "bn_histograms": lambda: viz.bn_histograms({f"bn{i}": {"before": hist(3), "after": hist(1)} for i in range(3)}),
    "filters_rgb": lambda: viz.filters_rgb(rng().random((8, 3, 3, 3)), rng().random((8, 3, 3, 3))),
    "filter_grid": lambda: viz.filter_grid(rng().normal(size=(4, 4, 3, 3)), rng().normal(size=(4, 4, 3, 3)), "c8"),
    "feature_maps": lambda: viz.feature_maps(images(2), rng().random((2, 3, 4, 4)), rng().random((2, 3, 4, 4)),
                                             "conv1", CLASSES, np.array([0, 1])),
    "through_layers": lambda: viz.through_layers(images(1)[0], {"conv1": rng().random((3, 8, 8)),
                                                                "conv2": rng().random((2, 4, 4))}),
    "cam_overlays": lambda: viz.cam_overlays(images(2), {"gradcam": rng().random((2, 8, 8))}, np.array([0, 1]),
                                             np.array([0, 2]), CLASSES),
    "faithfulness": lambda: viz.faithfulness(np.linspace(0, 1, 5), rng().random((3, 5)), rng().random((3, 5))),
    "sanity": lambda: viz.sanity(["fc", "conv2"], np.array([0.5, 0.1]), rng().random((3, 8, 8)), images(1)[0]),
    "tsne_gmm": lambda: viz.tsne_gmm(rng().normal(size=(50, 2)), np.arange(50) % 10, np.arange(50) % 4, CLASSES),
    "bic": lambda: viz.bic(rng().normal(size=(2, 4)), [2, 3, 4, 5], ["full", "diag"]),
    "contingency": lambda: viz.contingency(rng().integers(0, 9, (4, 10)), CLASSES),
    "confusion": lambda: viz.confusion(rng().integers(0, 9, (10, 10)), rng().random(10), CLASSES),
    "confusion_reliability": lambda: viz.confusion(rng().integers(0, 9, (10, 10)), rng().random(10), CLASSES, 0.1,
                                                   reliability_bins(rng().normal(size=(50, 10)), np.arange(50) % 10)),
    "accuracy_bars": lambda: viz.accuracy_bars(pivot()),
    "valid_curves": lambda: viz.valid_curves({"a": history(), "b": history()}, {"a": "plain", "b": "bn"}),
    "cam_grid": lambda: viz.cam_grid(images(2), rng().random((2, 2, 8, 8)), ["t0", "t1"], CLASSES,
                                     np.array([0, 1])),
    "tsne_grid": lambda: viz.tsne_grid([rng().normal(size=(30, 2))] * 2, [np.arange(30) % 10] * 2, ["t0", "t1"],
                                       CLASSES),
    "cam_grid_targets": lambda: viz.cam_grid(images(2), rng().random((2, 2, 8, 8)), ["t0", "t1"], CLASSES,
                                             np.array([0, 1]), targets=np.array([[0, 2], [1, 1]]), method="gradcam",
                                             groups=["a", "b"]),
    "tsne_grid_rows": lambda: viz.tsne_grid([rng().normal(size=(30, 2))] * 3, [np.arange(30) % 10] * 3,
                                            ["t0", "t1", "t2"], CLASSES, rows=["a", "b", "a"]),
}


def test_import_needs_no_torch_and_uses_agg():
    code = ("import sys, matplotlib, vgg_xai.viz; "
            "print(matplotlib.get_backend().lower(), sorted(m for m in ('torch', 'h5py', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MPLBACKEND": "TkAgg"}).stdout.split(maxsplit=1)
    assert out == ["agg", "[]\n"]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_function_draws_a_modest_figure_that_saves_as_png(name, tmp_path):
    fig = BUILDERS[name]()
    assert isinstance(fig, Figure)
    w, h = fig.get_size_inches()
    assert 2 <= w <= viz.MAX_WIDTH and 2 <= h <= viz.MAX_HEIGHT and fig.dpi == 100
    assert any(ax.images or ax.lines or ax.collections or ax.patches for ax in fig.axes)
    out = viz.save(fig, tmp_path / f"{name}.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert mpimg.imread(out).shape[:2] == (round(h * 100), round(w * 100))


# ---------------------------------------------------------------- save


def test_save_writes_png_of_the_figure_size_and_no_temporary(tmp_path):
    fig = viz.curves(history())
    w, h = fig.get_size_inches()
    path = tmp_path / "deep" / "dir" / "curves.png"
    assert viz.save(fig, str(path), dpi=50) == path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert mpimg.imread(path).shape[:2] == (round(h * 50), round(w * 50))
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]


def test_save_replaces_an_existing_file_by_rename(tmp_path):
    path = tmp_path / "fig.png"
    viz.save(viz.curves(history()), path)
    first, inode = path.read_bytes(), path.stat().st_ino
    second = viz.confusion(np.eye(10, dtype=int) * 5, np.ones(10), CLASSES)
    size = second.get_size_inches()
    viz.save(second, path)
    assert path.read_bytes() != first
    assert path.stat().st_ino != inode  # a new file renamed over the old, not rewritten in place
    assert mpimg.imread(path).shape[:2] == (round(size[1] * 100), round(size[0] * 100))
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "fig.png"
    viz.save(viz.curves(history()), path)
    before = path.read_bytes()
    fig = viz.curves(history())

    def broken(target, **kwargs):
        open(target, "wb").write(b"\x89PNG half")
        raise OSError("disk full")

    fig.savefig = broken
    with pytest.raises(OSError, match="disk full"):
        viz.save(fig, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]


def test_save_releases_figures(tmp_path):
    before = plt.get_fignums()
    drawn = []
    for i in range(20):
        if i % 2:
            fig = plt.figure()  # a pyplot figure, which pyplot would keep alive until closed
            fig.add_subplot().plot([0, 1], [1, 0])
        else:
            fig = viz.valid_curves({"a": history()}, {"a": "plain"})
        viz.save(fig, tmp_path / f"{i}.png")
        drawn.append(weakref.ref(fig))
    del fig
    gc.collect()
    assert plt.get_fignums() == before
    assert all(ref() is None for ref in drawn)  # nothing (pyplot included) keeps a saved figure alive
    assert len(list(tmp_path.glob("*.png"))) == 20


# ---------------------------------------------------------------- per trial


def test_curves_leave_out_non_finite_points():
    fig = viz.curves(history(epochs=6, diverged=True))
    loss, acc = fig.axes
    assert (loss.get_xlabel(), acc.get_xlabel()) == ("epoch", "epoch")
    lines = {(ax.get_title(), line.get_label()): line for ax in (loss, acc) for line in ax.lines}
    assert list(lines[("loss", "train")].get_xdata()) == [1, 2, 3, 4, 5]
    assert list(lines[("loss", "valid")].get_xdata()) == [1, 2, 3, 4, 5]
    assert list(lines[("accuracy", "train")].get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(line.get_ydata()).all() for line in lines.values())
    assert np.isfinite(loss.get_ylim()).all()


def test_curves_tick_whole_epochs_only():
    for fig in (viz.curves(history(epochs=2)), viz.valid_curves({"a": history(epochs=2)}, {"a": "plain"})):
        for ax in (a for a in fig.axes if a.get_xlabel() == "epoch"):
            ax.figure.canvas.draw()
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_bn_histograms_one_panel_per_layer_in_order():
    names = ["bn1", "bn2", "bn3", "bn4", "bn5"]
    fig = viz.bn_histograms({n: {"before": hist(3), "after": hist(1)} for n in names})
    assert [ax.get_title() for ax in fig.axes] == names  # the 3 spare cells of the 2x4 grid are gone
    assert all(len(ax.patches) == 2 and ax.get_yscale() == "log" for ax in fig.axes)
    assert legend_texts(fig.legends[0]) == ["before", "after"]


def test_bn_histograms_empty_is_an_error():
    with pytest.raises(ValueError, match="BatchNorm"):
        viz.bn_histograms({})


def test_weights_rgb_is_one_scale_symmetric_about_zero():
    w = np.stack([np.arange(-13.0, 14.0).reshape(3, 3, 3), np.full((3, 3, 3), 2.0), np.zeros((3, 3, 3))])
    rgb = viz.weights_rgb(w)
    assert rgb.shape == (3, 3, 3, 3)
    # One scale (13, the largest |w|) for every filter: 0 is grey, +-13 full, the constant 2 is
    # 0.5 + 1/13, not stretched to its own range as a per-filter scale would.
    np.testing.assert_allclose(rgb[0], (0.5 + 0.5 * np.arange(-13.0, 14.0).reshape(3, 3, 3) / 13).transpose(1, 2, 0))
    np.testing.assert_allclose(rgb[1], 0.5 + 1 / 13)
    np.testing.assert_allclose(rgb[2], 0.5)
    np.testing.assert_allclose(viz.weights_rgb(w, scale=26)[0, 0, 0, 0], 0.25)  # an explicit shared scale
    assert viz.weights_rgb(w, scale=1).max() == 1  # beyond the scale: clipped
    np.testing.assert_allclose(viz.weights_rgb(np.zeros((2, 3, 3, 3))), 0.5)  # all zero: grey, no NaN
    with pytest.raises(ValueError):
        viz.weights_rgb(np.zeros((4, 8, 3, 3)))


def test_filters_rgb_puts_both_models_on_one_scale_and_shows_the_difference():
    init = rng().normal(size=(8, 3, 3, 3)) * 0.1
    trained = init * 4  # training only made each filter stronger
    fig = viz.filters_rgb(init, trained)
    axes = image_axes(fig)
    assert [ax.get_title().split(" (")[0] for ax in axes] == ["untrained", "trained", "trained - untrained"]
    mosaics = [ax.images[0].get_array() for ax in axes]
    assert mosaics[1].shape == (11, 11, 3)  # 3x3 grid of 3x3 patches with 1-pixel gaps
    m = np.abs(trained).max()
    np.testing.assert_allclose(mosaics[1][4:7, 4:7], viz.weights_rgb(trained[4:5], m)[0], atol=1e-6)
    np.testing.assert_allclose(mosaics[0][4:7, 4:7], viz.weights_rgb(init[4:5], m)[0], atol=1e-6)
    # On the shared scale the untrained filters sit 4x closer to grey than the trained ones; a
    # per-filter scale would draw the two the same.
    dev = [np.abs(mz[:3, :3] - 0.5).max() for mz in mosaics[:2]]
    assert dev[1] > 3.9 * dev[0]
    diff = trained - init  # on a scale of its own
    np.testing.assert_allclose(mosaics[2][4:7, 4:7], viz.weights_rgb(diff[4:5], np.abs(diff).max())[0], atol=1e-6)
    assert f"{m:.3g}" in axes[1].get_xlabel()


def test_filter_grid_shares_one_scale_and_shows_the_difference():
    init, trained = rng().normal(size=(4, 5, 3, 3)), rng().normal(size=(4, 5, 3, 3)) * 3
    fig = viz.filter_grid(init, trained, "conv8")
    axes = [ax for ax in image_axes(fig) if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["conv8 untrained", "conv8 trained", "conv8 trained - untrained"]
    shared = max(np.abs(init).max(), np.abs(trained).max())
    diff = trained - init
    for ax, w, m in zip(axes, (init, trained, diff), (shared, shared, np.abs(diff).max())):
        im = ax.images[0]
        assert im.get_array().shape == (4 * 4 - 1, 5 * 4 - 1)  # rows = outputs, columns = inputs
        assert im.get_clim() == pytest.approx((-m, m))  # untrained and trained: the same colours mean the same
        np.testing.assert_allclose(im.get_array()[4:7, 8:11], w[1, 2])  # output 1, input 2
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("input channel", "output filter")


def test_filter_grid_of_zero_weights_keeps_a_scale():
    fig = viz.filter_grid(np.zeros((2, 2, 3, 3)), np.zeros((2, 2, 3, 3)), "c1")
    assert all(ax.images[0].get_clim() == (-1.0, 1.0) for ax in image_axes(fig) if ax.get_title())


def test_feature_maps_caps_rows_and_channels_and_normalizes_each_map():
    p, c = 8, 16
    maps = rng().normal(5, 3, (p, c, 4, 4))
    labels = np.arange(p) % 10
    imgs = images(p)
    fig = viz.feature_maps(imgs, maps, maps * 10, "conv1", CLASSES, labels)
    ax = mosaic_axes(fig)
    assert texts(ax.get_yticklabels()) == CLASSES[:6]  # 6 rows
    assert texts(ax.get_xticklabels()) == ["image"] + [f"ch {k}" for k in range(8)] * 2
    xs = ax.get_xticks()
    headers = {t.get_text(): t.xy[0] for t in ax.texts}
    assert xs[1] < headers["untrained"] < xs[8] < xs[9] < headers["trained"] < xs[16]
    grid = cut(ax)
    t = grid[0][0].shape[0]
    np.testing.assert_array_equal(grid[2][0], as_tile(imgs[2] / 255, t))
    shown = grid[0][1]
    np.testing.assert_allclose(shown, as_tile(viridis(own_range(maps[0, 0])), t), atol=1)
    assert {tuple(shown[i, j]) for i, j in ((0, 0), (-1, -1))} != {tuple(shown[0, 0])}  # not one flat colour
    np.testing.assert_array_equal(grid[0][9], shown)  # trained map of 10x the scale
    np.testing.assert_allclose(grid[5][8], as_tile(viridis(own_range(maps[5, 7])), t), atol=1)
    np.testing.assert_allclose(grid[5][16], as_tile(viridis(own_range(maps[5, 7])), t), atol=1)


def test_through_layers_one_row_per_layer():
    maps = {"conv1": rng().random((16, 8, 8)), "conv2": rng().random((4, 4, 4)), "conv3": rng().random((16, 2, 2))}
    image = images(1)[0]
    fig = viz.through_layers(image, maps)
    ax = mosaic_axes(fig)
    assert texts(ax.get_yticklabels()) == ["input", "conv1\n8x8", "conv2\n4x4", "conv3\n2x2"]
    assert texts(ax.texts) == [f"ch {k}" for k in range(8)]
    ys = ax.get_yticks()
    assert all(ys[0] < t.get_position()[1] < ys[1] for t in ax.texts)  # between the image and the layers
    grid = cut(ax, [t.get_position()[0] for t in ax.texts], ys)
    t = grid[0][0].shape[0]
    np.testing.assert_array_equal(grid[0][0], as_tile(image / 255, t))
    assert all(white(tile) for tile in grid[0][1:])  # the image alone in its row
    np.testing.assert_allclose(grid[1][7], as_tile(viridis(own_range(maps["conv1"][7])), t), atol=1)
    np.testing.assert_allclose(grid[2][3], as_tile(viridis(own_range(maps["conv2"][3])), t), atol=1)
    assert all(white(tile) for tile in grid[2][4:])  # conv2 has 4 channels
    np.testing.assert_allclose(grid[3][0], as_tile(viridis(own_range(maps["conv3"][0])), t), atol=1)


def test_cam_overlays_rows_titles_and_overlay():
    maps = {"gradcam": rng().random((3, 8, 8)), "hirescam": rng().random((3, 8, 8))}
    imgs = images(3)
    fig = viz.cam_overlays(imgs, maps, np.array([3, 5, 1]), np.array([5, 5, 1]), CLASSES)
    ax = mosaic_axes(fig)
    assert texts(ax.get_xticklabels()) == ["image", "gradcam", "hirescam"]
    rows = ax.get_yticklabels()
    assert texts(rows) == ["true: cat\npred: dog", "true: dog\npred: dog", "true: automobile\npred: automobile"]
    assert [t.get_color() for t in rows] == ["tab:red", "black", "black"]  # red: a wrong prediction
    grid = cut(ax)
    assert len(grid) == 3 and all(len(row) == 3 for row in grid)
    t = grid[0][0].shape[0]
    np.testing.assert_array_equal(grid[1][0], as_tile(imgs[1] / 255, t))
    np.testing.assert_allclose(grid[0][2], as_tile(overlay(imgs[0], maps["hirescam"][0]), t), atol=1)
    np.testing.assert_allclose(grid[2][1], as_tile(overlay(imgs[2], maps["gradcam"][2]), t), atol=1)


def test_cam_overlay_stretches_a_coarser_map_and_leaves_nan_bare():
    cam = rng().random((1, 4, 4))
    cam[0, 0, 0] = np.nan
    img = images(1)
    ax = mosaic_axes(viz.cam_overlays(img, {"cam": cam}, np.array([0]), np.array([0]), CLASSES))
    ((image_tile, cam_tile),) = cut(ax)
    t = image_tile.shape[0]
    stretched = cam[0].repeat(2, axis=0).repeat(2, axis=1)  # 4x4 over the 8x8 image
    expected = overlay(img[0], np.nan_to_num(stretched))
    expected[:2, :2] = img[0, :2, :2] / 255  # no colour where the map is NaN
    np.testing.assert_allclose(cam_tile, as_tile(expected, t), atol=1)


def test_mosaic_pixels_are_png_pixels(tmp_path):
    fig = viz.cam_overlays(images(2), {"gradcam": rng().random((2, 8, 8))}, np.array([0, 1]), np.array([0, 1]),
                           CLASSES)
    ax = mosaic_axes(fig)
    mosaic = ax.images[0].get_array()
    w, h = fig.get_size_inches() * 100
    box = ax.get_position()
    x0, y0 = round(box.x0 * w), round((1 - box.y1) * h)
    png = mpimg.imread(viz.save(fig, tmp_path / "cam.png"))
    shown = np.round(png[y0:y0 + mosaic.shape[0], x0:x0 + mosaic.shape[1], :3] * 255)
    np.testing.assert_array_equal(shown, mosaic)  # drawn 1:1: sharp tiles, no resampling


def test_faithfulness_auc_in_legend():
    x = np.array([0.0, 0.1, 0.3, 0.6, 1.0])  # uneven steps
    deletion = np.stack([1 - x] * 4)  # linear: the trapezoid sum is exact, 0.5
    insertion = np.stack([x ** 2 * 0.5, x ** 2 * 1.5])  # mean x^2: trapezoids give 0.350, not 1/3
    expected = sum((x[i + 1] - x[i]) * (x[i] ** 2 + x[i + 1] ** 2) / 2 for i in range(4))
    fig = viz.faithfulness(x, deletion, insertion, np.full((4, 5), 0.2), None)
    ax_del, ax_ins = fig.axes
    assert legend_texts(ax_del.get_legend()) == ["map (AUC 0.500)", "random map (AUC 0.200)"]
    assert legend_texts(ax_ins.get_legend()) == [f"map (AUC {expected:.3f})"]
    assert f"{expected:.3f}" == "0.350"
    assert [line.get_linestyle() for line in ax_del.lines] == ["-", "--"]
    assert len(ax_ins.collections) == 1  # the spread band of the one curve
    np.testing.assert_allclose(ax_ins.lines[0].get_ydata(), x ** 2)


def test_sanity_curve_and_strip():
    layers = ["classifier", "head.2", "conv2", "conv1"]
    maps = rng().random((5, 8, 8))
    image = images(1)[0]
    fig = viz.sanity(layers, np.array([0.9, 0.6, 0.3, 0.0]), maps, image)
    curve = next(ax for ax in fig.axes if ax.lines and not ax.images)
    assert [t.get_text() for t in curve.get_xticklabels()] == layers
    assert curve.get_ylim() == (-0.2, 1.05)
    strip = mosaic_axes(fig)
    titles = ["image", "trained", "to classifier", "to head.2", "to conv2", "to conv1"]
    assert texts(strip.texts) == titles
    xs, ys = zip(*(t.get_position() for t in strip.texts))
    assert len(set(ys)) == 1 and ys[0] < -0.5  # 6 maps: one row, the titles above its top edge
    (tiles,) = cut(strip, xs, [xs[0]])  # the first tile's top left corner is the mosaic's
    t = tiles[0].shape[0]
    np.testing.assert_array_equal(tiles[0], as_tile(image / 255, t))
    for k in range(5):
        np.testing.assert_allclose(tiles[1 + k], as_tile(viridis(own_range(maps[k])), t), atol=1)


def test_sanity_keeps_a_strongly_negative_correlation_in_view():
    fig = viz.sanity(["fc", "conv1"], np.array([-0.6, 0.2]), rng().random((3, 8, 8)), images(1)[0])
    curve = next(ax for ax in fig.axes if ax.lines and not ax.images)
    assert curve.get_ylim()[0] < -0.6 and curve.get_ylim()[1] == 1.05


def test_tsne_gmm_two_panels_with_labels_and_scores():
    n = 200
    labels, clusters = np.arange(n) % 10, np.arange(n) % 4
    fig = viz.tsne_gmm(rng().normal(size=(n, 2)), labels, clusters, CLASSES, {"ari": 0.4, "nmi": 0.51})
    left, right = fig.axes
    assert legend_texts(left.get_legend()) == CLASSES
    assert sum(len(c.get_offsets()) for c in left.collections) == n
    assert sum(len(c.get_offsets()) for c in right.collections) == n
    assert len(right.collections) == 4
    assert all(c.get_rasterized() for c in left.collections + right.collections)
    assert "ARI 0.400" in right.get_title() and "NMI 0.510" in right.get_title()


def test_bic_marks_the_best():
    b = np.array([[5.0, 3.0, np.nan, 4.0], [6.0, 2.0, 1.0, 7.0]])
    ks = [2, 3, 4, 5]
    ax = viz.bic(b, ks, ["full", "diag"], best=(3, "full")).axes[0]
    star = ax.lines[-1]
    assert (list(star.get_xdata()), list(star.get_ydata())) == ([3], [3.0])
    assert list(ax.lines[0].get_xdata()) == [2, 3, 5]  # the failed fit is left out
    default = viz.bic(b, ks, ["full", "diag"]).axes[0].lines[-1]  # no best given: the lowest BIC
    assert (list(default.get_xdata()), list(default.get_ydata())) == ([4], [1.0])


def test_bic_says_which_k_is_scored_and_why():
    b = np.array([[5.0, 3.0, np.nan, 4.0], [6.0, 2.0, 1.0, 7.0]])
    ks, types = [2, 3, 4, 5], ["full", "diag"]
    ax = viz.bic(b, ks, types, best=(4, "diag"), scored=(3, "full"), why="one component per class").axes[0]
    assert ax.get_title().splitlines() == ["Gaussian mixture model selection",
                                           "scored: k=3, full: one component per class"]
    ring, star = ax.lines[-2:]  # the scored fit ringed, the lowest BIC starred and said not to be scored
    assert (list(ring.get_xdata()), list(ring.get_ydata())) == ([3], [3.0]) and ring.get_label() == "scored: k=3, full"
    assert (list(star.get_xdata()), list(star.get_ydata())) == ([4], [1.0])
    assert star.get_label() == "lowest BIC, not scored: k=4, diag"
    assert legend_texts(ax.get_legend())[-2:] == ["scored: k=3, full", "lowest BIC, not scored: k=4, diag"]
    same = viz.bic(b, ks, types, scored=(4, "diag"), why="the lowest BIC").axes[0]  # scored is the lowest: no ring
    assert [x.get_label() for x in same.lines[2:]] == ["lowest BIC: k=4, diag"]


def test_contingency_writes_every_count():
    table = rng().integers(0, 50, (4, 10))
    ax = viz.contingency(table, CLASSES).axes[0]
    assert [int(t.get_text()) for t in ax.texts] == table.ravel().tolist()
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES


def test_confusion_counts_bars_and_ece():
    conf = rng().integers(0, 30, (10, 10)) + np.eye(10, dtype=int) * 300
    acc = np.diag(conf) / conf.sum(axis=1)
    fig = viz.confusion(conf, acc, CLASSES, ece=0.0344)
    matrix, bars = (ax for ax in fig.axes if ax.get_title())
    assert [int(t.get_text()) for t in matrix.texts] == conf.ravel().tolist()
    np.testing.assert_allclose(matrix.images[0].get_array(), conf / conf.sum(axis=1, keepdims=True))
    np.testing.assert_allclose([p.get_height() for p in bars.patches], acc)
    assert "ECE 0.034" in fig.get_suptitle()
    assert "ECE" not in viz.confusion(conf, acc, CLASSES).get_suptitle()


def logits_and_labels(n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    r = rng()
    labels = r.integers(0, 10, n)
    logits = r.normal(0, 1, (n, 10)) * r.uniform(0.2, 4, (n, 1))
    logits[np.arange(n), labels] += r.normal(1, 1, n)  # right more often than not, and over-confident
    return logits, labels


def test_confusion_with_reliability_diagram_beside_the_ece():
    logits, labels = logits_and_labels()
    r = reliability_bins(logits, labels)
    conf = rng().integers(0, 30, (10, 10))
    fig = viz.confusion(conf, rng().random(10), CLASSES, ece=0.0812, reliability=r)
    matrix, bars, rel = (ax for ax in fig.axes if ax.get_title())
    assert rel.get_title() == "reliability (ECE 0.081)" and "ECE 0.081" in fig.get_suptitle()
    assert legend_texts(rel.get_legend()) == ["perfectly calibrated", "share of images", "accuracy",
                                              "gap to mean confidence"]
    ok = r["count"] > 0
    accuracy, gap = rel.containers[:2]
    np.testing.assert_allclose([b.get_height() for b in accuracy], r["accuracy"][ok])
    np.testing.assert_allclose([b.get_x() for b in accuracy], r["edges"][:-1][ok])
    np.testing.assert_allclose([b.get_y() + b.get_height() for b in gap], r["confidence"][ok])  # up to the confidence
    assert (rel.get_xlim(), rel.get_ylim()) == ((0, 1), (0, 1))


# ---------------------------------------------------------------- per sweep


def test_accuracy_bars_grouped_with_missing_cell_left_out():
    ax = viz.accuracy_bars(pivot()).axes[0]
    heights = {c.get_label(): [round(p.get_height(), 3) for p in c.patches] for c in ax.containers
               if hasattr(c, "patches")}
    assert heights == {"lr1e-3": [0.7, 0.8, 0.72], "lr1e-2": [0.6, 0.75]}
    assert ax.get_ylabel() == "test_acc"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["plain", "bn", "l2"]
    assert "0.800\n2/3" in [t.get_text() for t in ax.texts]  # a seed missing
    assert not [line for line in ax.lines if line.get_linestyle() == "--"]  # no chance line unless asked for


def test_accuracy_bars_chance_line_and_degenerate_mark():
    p = pivot()
    p["cells"]["l2|lr1e-3"]["degenerate"] = ["l2-lr1e-3-s0"]
    ax = viz.accuracy_bars(p, chance=0.1).axes[0]
    (chance,) = [line for line in ax.lines if line.get_label().startswith("chance")]
    assert list(chance.get_ydata()) == [0.1, 0.1] and chance.get_linestyle() == "--"
    assert "chance (0.1)" in legend_texts(ax.get_legend())
    texts_ = [t.get_text() for t in ax.texts]
    assert "0.720†" in texts_ and "0.700" in texts_ and "† includes a degenerate trial" in texts_


def test_valid_curves_one_colour_per_variant_and_nan_skipped():
    ids = ["plain-a", "plain-b", "bn-a", "bn-b", "l2-a"]
    hs = {t: history(diverged=(i == 0)) for i, t in enumerate(ids)}
    ax = viz.valid_curves(hs, {t: t.split("-")[0] for t in ids}).axes[0]
    assert legend_texts(ax.get_legend()) == ["plain", "bn", "l2"]
    colours = [line.get_color() for line in ax.lines]
    assert colours[0] == colours[1] != colours[2] == colours[3] != colours[4]
    assert len(ax.lines[0].get_xdata()) == 4 and np.isfinite(ax.lines[0].get_ydata()).all()


def test_cam_grid_has_an_image_column_per_trial_plus_one():
    t, p = 3, 2
    ids = [f"bn-lr1e-3-s{i}" for i in range(t)]
    imgs = images(p)
    maps = rng().random((t, p, 8, 8))
    fig = viz.cam_grid(imgs, maps, ids, CLASSES, np.array([2, 9]))
    ax = mosaic_axes(fig)
    assert texts(ax.get_xticklabels()) == ["image"] + ids
    assert texts(ax.get_yticklabels()) == ["bird", "truck"]
    grid = cut(ax)
    tile = grid[0][0].shape[0]
    # The mosaic is exactly p rows of t + 1 tiles: nothing else in it.
    mosaic = ax.images[0].get_array()
    assert mosaic.shape[1] == round(ax.get_xticks()[-1] + (tile + 1) / 2) and ax.get_xticks()[0] == (tile - 1) / 2
    assert mosaic.shape[0] == round(ax.get_yticks()[-1] + (tile + 1) / 2) and ax.get_yticks()[0] == (tile - 1) / 2
    for i in range(p):
        np.testing.assert_array_equal(grid[i][0], as_tile(imgs[i] / 255, tile))
        for j in range(t):
            np.testing.assert_allclose(grid[i][1 + j], as_tile(overlay(imgs[i], maps[j, i]), tile), atol=1)


def test_cam_grid_names_the_method_and_the_targets_that_are_not_the_true_class():
    ids = ["plain-a", "plain-b", "bn-a"]
    labels = np.array([2, 9])
    targets = np.array([[2, 9], [3, 9], [2, 0]])  # plain-b calls the bird a cat, bn-a the truck an airplane
    fig = viz.cam_grid(images(2), rng().random((3, 2, 8, 8)), ids, CLASSES, labels, targets=targets,
                       method="gradcam", groups=["plain", "plain", "bn"])
    assert fig.get_suptitle().startswith("gradcam maps across trials\ntarget: the model's prediction")
    ax = mosaic_axes(fig)
    xs, ys = ax.get_xticks(), ax.get_yticks()
    written = {(t.get_text(), t.get_position()[0], t.get_position()[1] > ys[0]) for t in ax.texts}
    assert {(w, x) for w, x, _ in written} == {("cat", xs[2]), ("airplane", xs[3])}  # under their columns
    assert all(t.get_color() == "tab:red" for t in ax.texts)
    gaps = np.diff(xs)
    assert gaps[2] > gaps[1]  # a wider gap between the plain and the bn columns
    assert viz.cam_grid(images(2), rng().random((3, 2, 8, 8)), ids, CLASSES, labels).get_suptitle() == \
        "class activation maps across trials"


def test_cam_grid_stays_a_sane_size_for_many_trials():
    t = 40
    fig = viz.cam_grid(images(1), rng().random((t, 1, 8, 8)), [f"t{i}" for i in range(t)], CLASSES, np.array([0]))
    ax = mosaic_axes(fig)
    assert len(ax.get_xticks()) == t + 1
    w = fig.get_size_inches()[0]
    assert w <= viz.MAX_WIDTH + 1e-9
    assert ax.get_position().width * w / (t + 1) >= 0.4  # each column still about half an inch wide


def test_tsne_grid_one_panel_per_trial_and_shared_legend():
    ids = [f"t{i}" for i in range(7)]
    embs = [rng().normal(size=(40, 2)) for _ in ids]
    fig = viz.tsne_grid(embs, [np.arange(40) % 10] * 7, ids, CLASSES)
    assert [ax.get_title() for ax in fig.axes] == ids  # 2 rows of 5, spare cells removed
    assert len(fig.legends) == 1 and legend_texts(fig.legends[0]) == CLASSES


def test_tsne_grid_one_row_per_variant():
    ids = ["plain-a", "plain-b", "plain-c", "bn-a", "l2-a", "l2-b"]
    fig = viz.tsne_grid([rng().normal(size=(30, 2)) for _ in ids], [np.arange(30) % 10] * 6, ids, CLASSES,
                        rows=[t.split("-")[0] for t in ids])
    assert [ax.get_title() for ax in fig.axes] == ids  # 3 rows of up to 3; the spare cells removed
    rows = {ax.get_title(): round(ax.get_position().y0, 3) for ax in fig.axes}
    cols = {ax.get_title(): round(ax.get_position().x0, 3) for ax in fig.axes}
    assert rows["plain-a"] == rows["plain-c"] > rows["bn-a"] > rows["l2-a"] == rows["l2-b"]
    assert cols["plain-a"] == cols["bn-a"] == cols["l2-a"] < cols["plain-b"] == cols["l2-b"]


def test_tsne_grid_keeps_a_labelled_grey_panel_for_a_trial_without_an_embedding():
    ids = ["plain-a", "plain-b", "bn-a"]
    why = {"plain-b": "the test images' feature vectors are nearly identical: no neighbourhoods to embed"}
    embs = [rng().normal(size=(30, 2)), None, rng().normal(size=(30, 2))]
    fig = viz.tsne_grid(embs, [np.arange(30) % 10, None, np.arange(30) % 10], ids, CLASSES,
                        rows=["plain", "plain", "bn"], why=why)
    assert [ax.get_title() for ax in fig.axes] == ids  # every trial has its panel, in place
    grey = fig.axes[1]
    assert not grey.collections and grey.get_facecolor()[:3] == (viz.LEFT_OUT_GREY,) * 3
    (text,) = grey.texts
    assert " ".join(text.get_text().split()) == f"no t-SNE: {why['plain-b']}"
    assert all(ax.collections for ax in (fig.axes[0], fig.axes[2]))
    assert fig.get_suptitle().splitlines()[1] == "grey: 1 of 3 trials have no embedding (why: in the panel)"


def test_cam_grid_keeps_a_labelled_grey_column_for_a_trial_without_maps():
    ids = ["t0", "t1", "t2"]
    maps = [rng().random((2, 8, 8)), None, rng().random((2, 8, 8))]
    targets = [np.array([2, 9]), None, np.array([1, 9])]
    fig = viz.cam_grid(images(2), maps, ids, CLASSES, np.array([2, 9]), targets=targets, why={"t1": "collapsed"})
    ax = mosaic_axes(fig)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["image", *ids]
    centre = ax.get_xticks()[2]
    x = int(centre)  # t1's column: grey from top to bottom, under its id
    column = ax.images[0].get_array()[:, x]
    tiles = column[(column != 255).any(axis=1)]
    assert len(tiles) and (tiles == round(viz.LEFT_OUT_GREY * 255)).all()
    reasons = [t for t in ax.texts if t.get_rotation() == 90]
    assert [t.get_text() for t in reasons] == ["no maps: collapsed"] and reasons[0].get_position()[0] == centre
    assert [t.get_text() for t in ax.texts if t.get_rotation() != 90] == ["automobile"]  # t2's first target only
    assert fig.get_suptitle().splitlines()[-1] == "grey: 1 of 3 trials have no maps (why: down the column)"
