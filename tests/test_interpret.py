"""The interpretation suite's computation, on tiny models and synthetic data (CPU, seconds).

The central fixture is a small ConvNet trained for a few seconds on images whose class is the
colour of one 8x8 patch at a random place: its decision depends on that region only, so a
correct map must peak there, deleting the patch first must hurt it, and so on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vgg_xai.config import TrialConfig
from vgg_xai.interpret.activations import bn_histograms
from vgg_xai.interpret.cam import METHODS, activations_and_gradients, cam, gap_input_layer
from vgg_xai.interpret.clusters import bic_scan, cluster_scores, contingency, fit_gmm
from vgg_xai.interpret.embedding import pca, tsne, tsne_method
from vgg_xai.interpret import degenerate
from vgg_xai.interpret.faithfulness import curve_auc, deletion_auc, insertion_auc, perturbation_curves, pixel_order
from vgg_xai.interpret.filters import conv_weights, feature_maps, through_every_conv
from vgg_xai.interpret.hooks import capture, inference_copy
from vgg_xai.interpret.metrics import calibration_error, confusion, ece, per_class_accuracy, reliability_bins
from vgg_xai.interpret.probes import probe_indices
from vgg_xai.interpret.sanity import cascading_randomization, randomization_check, spearman_rows
from vgg_xai.model import build_model

PATCH = 8


def patch_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized-looking noise with one 8x8 patch; class 0/1/2 = the patch is red/green/blue."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
    y = torch.randint(0, 3, (n,), generator=g)
    pos = torch.randint(0, 32 - PATCH + 1, (n, 2), generator=g)
    for i in range(n):
        r, c = pos[i].tolist()
        x[i, :, r:r + PATCH, c:c + PATCH] = -1.0
        x[i, y[i], r:r + PATCH, c:c + PATCH] = 2.5
    return x, y, pos


@pytest.fixture(scope="module")
def patch_model() -> nn.Module:
    """simple_cnn, width 0.25, head=linear, trained ~2 s to read the patch colour."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(TrialConfig(arch="simple_cnn", width=0.25, head="linear",
                                        variant="plain", init="kaiming"))
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        x, y, _ = patch_images(2048, seed=1)
        for _ in range(150):
            i = torch.randint(0, len(x), (64,))
            loss = nn.functional.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return model


@pytest.fixture(scope="module")
def probes(patch_model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y, pos = patch_images(48, seed=2)
    with torch.no_grad():
        assert (patch_model(x).argmax(1) == y).float().mean() > 0.95  # the fixture learned the task
    return x, y, pos


def vgg(**kw) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_model(TrialConfig(width=0.125, **kw))


def assert_untouched(model: nn.Module, training: dict, inplace: dict) -> None:
    """No hooks left on any module, and every module's training/inplace flag as before."""
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(m, attr), f"{name or 'model'} still has {attr}"
        assert m.training == training[name], name
        if name in inplace:
            assert m.inplace == inplace[name], name
    assert all(p.grad is None for p in model.parameters()), "gradients leaked into parameters"


def flags(model: nn.Module) -> tuple[dict, dict]:
    return ({n: m.training for n, m in model.named_modules()},
            {n: m.inplace for n, m in model.named_modules() if isinstance(getattr(m, "inplace", None), bool)})


# ------------------------------------------------------------------------------- probes


def test_probe_indices_cover_every_class_by_seed():
    labels = np.repeat(np.arange(10), 50)[np.random.default_rng(0).permutation(500)]
    idx = probe_indices(labels, seed=3, per_class=2)
    assert np.array_equal(labels[idx], np.repeat(np.arange(10), 2))  # every class, class 0 first
    assert np.array_equal(idx, probe_indices(labels, seed=3, per_class=2))
    assert not np.array_equal(idx, probe_indices(labels, seed=4, per_class=2))
    with pytest.raises(ValueError, match="class 9"):
        probe_indices(np.r_[labels[labels != 9], 9], per_class=2)


# ------------------------------------------------------------------------------ filters


def test_feature_map_shapes_follow_the_layers():
    model = vgg(variant="bn")
    x = torch.randn(3, 3, 32, 32)
    assert feature_maps(model, "conv1", x).shape == (3, 8, 32, 32)
    assert feature_maps(model, "conv8", x).shape == (3, 64, 16, 16)  # pool2 comes after conv8
    maps = through_every_conv(model, x[1])
    assert list(maps) == [f"conv{i}" for i in range(1, 9)]
    for name, conv in model.conv_layers():
        assert maps[name].shape[0] == conv.out_channels
    np.testing.assert_allclose(maps["conv5"], feature_maps(model, "conv5", x)[1], atol=1e-5)
    assert conv_weights(model, "conv2").shape == (16, 8, 3, 3)


def test_feature_maps_are_the_conv_output_despite_inplace_relu():
    model = vgg(variant="plain")  # conv -> ReLU(inplace=True): a naive hook would see post-ReLU
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.features.conv1(x).numpy()
    got = feature_maps(model, "conv1", x)
    assert (got < 0).any()
    np.testing.assert_allclose(got, expected, atol=1e-5)


# -------------------------------------------------------------------------- activations


def test_bn_histograms_one_entry_per_bn_counting_every_activation():
    model = vgg(variant="bn")
    x = torch.randn(4, 3, 32, 32)
    h = bn_histograms(model, x, bins=20)
    assert list(h) == [n for n, _ in model.batchnorms()] and len(h) == 8
    for name, conv in model.conv_layers():
        n_act = feature_maps(model, name, x).size
        for side in ("before", "after"):
            counts, edges = h[f"bn{name[4:]}"][side]["counts"], h[f"bn{name[4:]}"][side]["edges"]
            assert counts.sum() == n_act and len(edges) == 21
    assert bn_histograms(vgg(variant="plain"), x) == {}


# ---------------------------------------------------------------------------------- cam


@pytest.mark.parametrize("method", METHODS)
def test_cam_peaks_on_the_patch_the_model_uses(patch_model, probes, method):
    x, y, pos = probes
    maps = cam(patch_model, x, method)
    assert maps.shape == (len(x), 32, 32) and maps.min() >= 0 and maps.max() <= 1
    inside = np.zeros(maps.shape, dtype=bool)
    for i, (r, c) in enumerate(pos.tolist()):
        inside[i, r:r + PATCH, c:c + PATCH] = True
    peak_r, peak_c = np.unravel_index(maps.reshape(len(x), -1).argmax(1), (32, 32))
    near = [(r - 4 <= pr < r + PATCH + 4) and (c - 4 <= pc < c + PATCH + 4)
            for (r, c), pr, pc in zip(pos.tolist(), peak_r, peak_c)]
    assert np.mean(near) >= 0.9
    mean_in = (maps * inside).sum((1, 2)) / inside.sum((1, 2))
    mean_out = (maps * ~inside).sum((1, 2)) / (~inside).sum((1, 2))
    assert np.median(mean_in / (mean_out + 1e-9)) > 2


def test_cam_is_gradcam_at_the_pooled_layer_for_a_linear_head(patch_model, probes):
    # For GAP -> Linear, dLogit/dA = w / (h*w) everywhere: Grad-CAM there is CAM (Selvaraju et al.).
    x = probes[0][:8]
    np.testing.assert_allclose(cam(patch_model, x, "gradcam", layer=gap_input_layer(patch_model)),
                               cam(patch_model, x, "cam"), atol=1e-5)


def test_own_gradients_match_captum_gradcam(patch_model, probes):
    x = probes[0][:8]
    t = torch.as_tensor([0, 1, 2, 0, 1, 2, 0, 1])
    acts, grads = activations_and_gradients(patch_model, x, t, "relu3")
    raw = (grads.mean((2, 3), keepdim=True) * acts).sum(1).clamp_min(0)[:, None]
    up = nn.functional.interpolate(raw, size=(32, 32), mode="bilinear")[:, 0]
    lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
    np.testing.assert_allclose(((up - lo) / (hi - lo)).numpy(), cam(patch_model, x, "gradcam", t), atol=1e-5)


def test_targets_select_the_class_explained(patch_model, probes):
    x, y, _ = probes
    assert np.allclose(cam(patch_model, x[:6], targets=y[:6]), cam(patch_model, x[:6]), atol=1e-6)
    assert not np.allclose(cam(patch_model, x[:6], targets=(y[:6] + 1) % 3), cam(patch_model, x[:6]))


def test_plain_cam_on_the_mlp_head_says_use_gradcam():
    with pytest.raises(ValueError, match=r"plain CAM needs head=linear.*gradcam"):
        cam(vgg(head="mlp"), torch.randn(2, 3, 32, 32), "cam")


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "gradcam++"])
def test_cam_leaves_no_trace(method):
    model = vgg(variant="bn_dropout", head="mlp").train()
    model.features.bn3.eval()  # a mixed state must come back exactly
    before = flags(model)
    x = torch.randn(3, 3, 32, 32)
    x0 = x.clone()
    maps = cam(model, x, method)
    assert maps.shape == (3, 32, 32)
    assert torch.equal(x, x0) and not x.requires_grad
    assert_untouched(model, *before)


def test_inference_copy_computes_the_same_outputs_and_leaves_the_model_alone():
    model = vgg(variant="bn").train()
    with torch.no_grad():  # running statistics that are not the identity, as after training
        for _, bn in model.batchnorms():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    before = flags(model)
    x = torch.randn(5, 3, 32, 32)
    fast = inference_copy(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # folded into the convs
    with torch.no_grad():
        expected = model.eval()(x)
        model.train()
        np.testing.assert_allclose(fast(x).numpy(), expected.numpy(), atol=1e-4)
    assert len(model.batchnorms()) == 8
    assert_untouched(model, *before)


def test_hooks_removed_and_modes_restored_on_errors():
    model = vgg(variant="bn").train()
    before = flags(model)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, ["conv1", "bn2"], inputs=True) as rec:
            model(x)
            assert set(rec.outputs) == {"conv1", "bn2"} and not model.training
            raise RuntimeError("boom")
    assert_untouched(model, *before)
    for method in ("gradcam", "gradcam++"):
        with pytest.raises((IndexError, RuntimeError)):
            cam(model, x, method, targets=[99, 99])  # fails inside Captum / our backward
        assert_untouched(model, *before)
    with pytest.raises(ValueError, match="not found"):
        cam(model, x, layer="conv99")
    assert_untouched(model, *before)


# ------------------------------------------------------------------------- faithfulness


def test_deletion_and_insertion_prefer_the_true_map(patch_model, probes):
    x, y, _ = probes
    maps = cam(patch_model, x, "gradcam")
    rnd = np.random.default_rng(0).random(maps.shape)
    x0 = x.clone()
    assert deletion_auc(patch_model, x, maps, y).mean() < deletion_auc(patch_model, x, rnd, y).mean() - 0.2
    assert insertion_auc(patch_model, x, maps, y).mean() > insertion_auc(patch_model, x, rnd, y).mean() + 0.02
    assert torch.equal(x, x0)


def test_perturbation_curves_run_from_image_to_baseline(patch_model, probes):
    x, y, _ = probes
    maps = cam(patch_model, x[:5])
    frac, probs = perturbation_curves(patch_model, x[:5], maps, y[:5], "deletion", steps=4)
    np.testing.assert_allclose(frac, [0, 0.25, 0.5, 0.75, 1])
    with torch.no_grad():
        start = patch_model(x[:5]).softmax(1)[torch.arange(5), y[:5]].numpy()
        end = patch_model(torch.zeros_like(x[:5])).softmax(1)[torch.arange(5), y[:5]].numpy()
    np.testing.assert_allclose(probs[:, 0], start, atol=1e-5)
    np.testing.assert_allclose(probs[:, -1], end, atol=1e-5)
    _, ins = perturbation_curves(patch_model, x[:5], maps, y[:5], "insertion", steps=4)
    np.testing.assert_allclose(ins[:, 0], end, atol=1e-5)
    np.testing.assert_allclose(ins[:, -1], start, atol=1e-5)


def test_tied_pixels_have_one_fixed_order():
    """Ties (a rectified map's zeros) go by the tiebreak map, then row-major; an image's order does
    not depend on the other images of the batch, and an all-zero map is ordered as the tiebreak."""
    rng = np.random.default_rng(0)
    maps = np.where(rng.random((6, 8, 8)) < 0.4, 0.0, rng.random((6, 8, 8)))  # 40% exact zeros
    maps[5] = 0.0
    rnd = rng.random(maps.shape)
    order = pixel_order(maps, rnd)
    for i in range(len(maps)):
        assert np.array_equal(order[i], pixel_order(maps[i:i + 1], rnd[i:i + 1])[0])  # alone = in the batch
        m, t = maps[i].ravel()[order[i]], rnd[i].ravel()[order[i]]
        assert np.all(np.diff(m) <= 0)  # highest first
        tied = np.diff(m) == 0
        assert np.all(np.diff(t)[tied] < 0)  # ties by the tiebreak, highest first
    assert np.array_equal(order[5], np.argsort(-rnd[5].ravel()))
    assert np.array_equal(pixel_order(np.zeros((2, 3, 3))), np.tile(np.arange(9), (2, 1)))  # default: row-major
    assert np.array_equal(pixel_order(maps, rnd), order)  # the same every time


def test_an_all_zero_map_scores_as_the_random_map_that_breaks_its_ties(patch_model, probes):
    x, y, _ = probes
    rnd = np.random.default_rng(0).random((8, 32, 32))
    _, zero = perturbation_curves(patch_model, x[:8], np.zeros((8, 32, 32)), y[:8], "deletion", 8, tiebreak=rnd)
    _, random = perturbation_curves(patch_model, x[:8], rnd, y[:8], "deletion", 8)
    np.testing.assert_array_equal(zero, random)
    assert curve_auc(zero).shape == (8,)


# ------------------------------------------------------------------------------- sanity


def test_cascading_randomization_destroys_the_maps(patch_model, probes):
    x = probes[0]
    state = {k: v.clone() for k, v in patch_model.state_dict().items()}
    out = cascading_randomization(patch_model, x, "gradcam", seed=0)
    assert out["layers"] == ["classifier", "conv3", "conv2", "conv1"]
    rho = out["spearman"]
    assert rho.shape == (4,) and out["maps"].shape == (5, len(x), 32, 32)
    assert np.all(rho < 0.9) and rho[-1] < rho[0] - 0.1 and rho[-1] < 0.5
    for k, v in patch_model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed in the caller's model"
    assert_untouched(patch_model, *flags(patch_model))


def test_randomization_order_covers_the_mlp_head():
    out = cascading_randomization(vgg(head="mlp"), torch.randn(2, 3, 32, 32), "gradcam")
    assert out["layers"] == ["classifier", "head.fc2", "head.fc1"] + [f"conv{i}" for i in range(8, 0, -1)]


def test_spearman_of_a_flat_map_is_undefined_not_zero():
    rng = np.random.default_rng(0)
    a, b = rng.random((4, 8, 8)), rng.random((4, 8, 8))
    a[1], b[2], b[3] = 0.0, 0.7, a[3]
    rho = spearman_rows(a, b)
    assert np.isnan(rho[1]) and np.isnan(rho[2])  # all zero, constant
    assert rho[3] == pytest.approx(1) and -1 <= rho[0] <= 1


def test_randomization_check_leaves_out_and_counts_all_zero_maps(patch_model, probes, monkeypatch):
    """Over several draws: mean and std of the signed and absolute correlation over the defined
    (draw, image) pairs; images whose trained map is all zero are left out of every step and
    counted, never scored 0."""
    import vgg_xai.interpret.sanity as sanity

    real = sanity.raw_cam

    def zero_first_two(*args, **kw):
        maps = real(*args, **kw)
        maps[:2] = 0.0
        return maps

    x = probes[0][:12]
    monkeypatch.setattr(sanity, "raw_cam", zero_first_two)
    out = randomization_check(patch_model, x, "gradcam", draws=3, seed=0)
    steps = len(out["layers"])
    assert out["n_draws"] == 3 and out["n_images"] == 12 and out["flat_trained"] == 2
    assert out["spearman_per_draw"].shape == (3, steps)
    assert np.all(out["n_pairs"] + out["n_degenerate"] == 36) and np.all(out["n_degenerate"] >= 6)
    per = np.stack([cascading_randomization(patch_model, x, "gradcam", seed=d)["spearman_per_image"]
                    for d in range(3)])  # zeroed maps too: the patched cam is used by both
    assert np.isnan(per[:, :, :2]).all()
    last = per[:, -1][np.isfinite(per[:, -1])]
    assert len(last) == out["n_pairs"][-1]
    assert out["spearman"][-1] == pytest.approx(last.mean())
    assert out["spearman_std"][-1] == pytest.approx(last.std())
    per_abs = np.stack([cascading_randomization(patch_model, x, "gradcam", seed=d)["abs_spearman_per_image"]
                        for d in range(3)])
    last_abs = per_abs[:, -1][np.isfinite(per_abs[:, -1])]
    assert out["abs_spearman"][-1] == pytest.approx(last_abs.mean())
    assert out["abs_spearman_std"][-1] == pytest.approx(last_abs.std())
    assert out["n_compared"] == 36
    # Draws differ; the same seed gives the same draws.
    assert not np.allclose(out["spearman_per_draw"][0], out["spearman_per_draw"][1])
    again = randomization_check(patch_model, x, "gradcam", draws=3, seed=0)
    np.testing.assert_array_equal(again["spearman"], out["spearman"])


def test_the_abs_statistic_ranks_the_unrectified_maps_and_has_a_noise_floor(patch_model, probes):
    """ABS (Adebayo et al.): Spearman correlation of the absolute values of the unrectified maps, here
    recomputed by hand with scipy.stats.spearmanr after re-initializing the classifier as the cascade's
    first step does; the floor is the same statistic between the trained maps of different images."""
    import copy

    from scipy.stats import spearmanr

    from vgg_xai.interpret.cam import signed_cam
    from vgg_xai.interpret.sanity import _reinit

    x = probes[0][:8]
    out = cascading_randomization(patch_model, x, "gradcam", seed=0)
    trained = signed_cam(patch_model, x, "gradcam")
    net = copy.deepcopy(patch_model)
    _reinit(net.classifier, torch.Generator().manual_seed(0))
    first = signed_cam(net, x, "gradcam", targets=patch_model(x).argmax(1))
    want = [spearmanr(np.abs(a).ravel(), np.abs(b).ravel())[0] for a, b in zip(trained, first)]
    np.testing.assert_allclose(out["abs_spearman_per_image"][0], want, rtol=1e-6, atol=1e-9)

    check = randomization_check(patch_model, x, "gradcam", draws=2, seed=0)
    floor = [spearmanr(np.abs(trained[i]).ravel(), np.abs(trained[i - 1]).ravel())[0] for i in range(8)]
    assert check["abs_floor"] == pytest.approx(np.mean(floor), rel=1e-6) and check["abs_floor_n"] == 8
    assert check["abs_floor_std"] == pytest.approx(np.std(floor), rel=1e-6)
    rect = out["maps"][0]
    plain_floor = [spearmanr(rect[i].ravel(), rect[i - 1].ravel())[0] for i in range(8)]
    assert check["floor"] == pytest.approx(np.nanmean(plain_floor), rel=1e-6)


def test_gradcam_pp_is_pytorch_grad_cams_formula():
    """pytorch-grad-cam's GradCAMPlusPlus.get_cam_weights, written out in numpy (its eps of 1e-6), on
    gradients as small as a trained VGG's last layer has (squares near 2e-7), where the constant matters."""
    from vgg_xai.interpret.cam import gradcam_pp_weights

    rng = np.random.default_rng(0)
    acts = np.abs(rng.normal(0, 1, (3, 8, 4, 4)))
    grads = rng.normal(0, 4.5e-4, (3, 8, 4, 4))
    grads[0, 0] = 0.0
    g2, g3 = grads ** 2, grads ** 3
    sum_acts = acts.sum(axis=(2, 3))
    aij = g2 / (2 * g2 + sum_acts[:, :, None, None] * g3 + 0.000001)
    aij = np.where(grads != 0, aij, 0)
    want = (np.maximum(grads, 0) * aij).sum(axis=(2, 3))
    got = gradcam_pp_weights(torch.tensor(acts), torch.tensor(grads)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)


# --------------------------------------------------------------- embedding and clusters


def blobs(n_per: int, k: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, size=(k, dim))
    x = np.concatenate([rng.normal(c, 1.0, size=(n_per, dim)) for c in centres])
    return x, np.repeat(np.arange(k), n_per)


def test_gmm_recovers_separated_clusters_and_bic_finds_their_number():
    x, y = blobs(80, 4, 5)
    fit = fit_gmm(x, k=4, seed=0)
    assert fit["converged"] and fit["means"].shape == (4, 5) and fit["n_iter"] >= 1
    assert cluster_scores(y, fit["labels"])["ari"] > 0.9
    scan = bic_scan(x, ks=range(2, 8), covariance_types=("full", "spherical"))
    assert scan["bic"].shape == (2, 6) and scan["best"][0] == 4


def test_tsne_keeps_separated_clusters_apart():
    x, y = blobs(70, 3, 60)  # > 50 dims: goes through PCA first
    emb = tsne(x, seed=0)
    assert emb.shape == (210, 2)
    d = ((emb[:, None] - emb[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (y[d.argmin(1)] == y).mean() > 0.95
    assert pca(x, 50).shape == (210, 50) and pca(x[:10], 50).shape == (10, 10)


def test_tsne_refuses_what_would_turn_into_nan():
    """openTSNE turns identical vectors into NaN (its initialization divides by their spread) and
    can crash on NaN: neither reaches it."""
    x, _ = blobs(20, 3, 5)
    x[4, 2] = np.nan
    with pytest.raises(ValueError, match="1 of 60 vectors are not finite"):
        tsne(x)
    with pytest.raises(ValueError, match="all 60 vectors are the same"):
        tsne(np.ones((60, 512), dtype=np.float32))
    assert tsne_method(10_000, "fft") == "fft" and tsne_method(500) == "bh"


def test_bic_scan_in_threads_is_the_sequential_scan():
    x, _ = blobs(60, 3, 4)
    one = bic_scan(x, ks=range(2, 6), covariance_types=("full", "diag"))
    two = bic_scan(x, ks=range(2, 6), covariance_types=("full", "diag"), n_jobs=2)
    np.testing.assert_array_equal(one["bic"], two["bic"])
    assert one["best"] == two["best"]


def test_degenerate_features_and_maps_are_named():
    classes = [f"c{i}" for i in range(10)]
    same = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (200, 1))
    checks, reasons = degenerate.feature_checks(same, np.zeros((200, 10)), np.full(200, 3), classes)
    assert checks["distinct_features"] == 1 and checks["feature_std"] == 0 and checks["predicted_classes"] == 1
    assert reasons == ["every test image gets the same feature vector (feature std 0)",
                       "one predicted class for all 200 test images (c3)"]
    assert degenerate.collapsed(checks) and degenerate.insensitive(checks)
    x, y = blobs(20, 10, 16)
    checks, reasons = degenerate.feature_checks(x, x[:, :10], y, classes)
    assert reasons == [] and not degenerate.collapsed(checks) and checks["predicted_classes"] == 10

    maps = np.random.default_rng(0).random((10, 8, 8))
    maps[:8] = 0.0
    c = degenerate.map_checks(maps, "cam")
    assert c["cam_zero_maps"] == 8 and degenerate.degenerate_maps(c, "cam")
    assert degenerate.maps_finding(c, "cam") == "8 of 10 all zero"
    same_map = np.tile(np.random.default_rng(1).random((1, 8, 8)), (10, 1, 1)) + 1e-6 * np.arange(10)[:, None, None]
    c = degenerate.map_checks(same_map, "cam")
    assert c["cam_identical_maps"] and degenerate.maps_finding(c, "cam") == "all 10 the same map"
    c = degenerate.map_checks(np.random.default_rng(2).random((10, 8, 8)), "cam")
    assert not degenerate.degenerate_maps(c, "cam")


def test_cluster_scores():
    y = np.repeat(np.arange(5), 40)
    perfect, permuted = cluster_scores(y, y), cluster_scores(y, (y + 2) % 5)
    for s in (perfect, permuted):
        assert s["ari"] == pytest.approx(1) and s["nmi"] == pytest.approx(1) and s["purity"] == 1
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5000)
    chance = cluster_scores(labels, rng.integers(0, 10, 5000))
    assert abs(chance["ari"]) < 0.01 and chance["nmi"] < 0.01
    small_labels, small_clusters = np.array([0, 0, 1, 1, 1, 2]), np.array([0, 0, 0, 1, 1, 1])
    assert cluster_scores(small_labels, small_clusters)["purity"] == pytest.approx(4 / 6)
    np.testing.assert_array_equal(contingency(small_labels, small_clusters, 3), [[2, 1, 0], [0, 2, 1]])


# ------------------------------------------------------------------------------ metrics


def test_confusion_and_per_class_accuracy_by_hand():
    labels, preds = np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 1, 1, 0, 2])
    np.testing.assert_array_equal(confusion(labels, preds, 4), [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    acc = per_class_accuracy(labels, preds, 4)
    np.testing.assert_allclose(acc[:3], [0.5, 2 / 3, 1.0])
    assert np.isnan(acc[3])


def synthetic_predictions(n: int, shift: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits with top-class confidence p; the top class is right with probability p - shift."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.35, 1.0, n)
    pred = rng.integers(0, 10, n)
    probs = np.repeat(((1 - p) / 9)[:, None], 10, axis=1)
    probs[np.arange(n), pred] = p
    right = rng.random(n) < np.clip(p - shift, 0, 1)
    labels = np.where(right, pred, (pred + rng.integers(1, 10, n)) % 10)
    return np.log(probs), labels


def test_ece():
    assert ece(*synthetic_predictions(20000, 0.0)) < 0.02
    assert ece(*synthetic_predictions(20000, 0.3)) > 0.25
    # By hand: confidences 0.9 (right) and 0.6 (wrong) in different bins -> (0.1 + 0.6) / 2.
    logits = np.log(np.array([[0.9, 0.1], [0.6, 0.4]]))
    assert ece(logits, np.array([0, 1]), bins=10) == pytest.approx(0.35)


def test_reliability_bins_by_hand():
    # Confidences 0.92 (right), 0.96 (wrong) and 0.55 (right): two in bin (0.9, 1.0], one in (0.5, 0.6].
    logits = np.log(np.array([[0.92, 0.08], [0.04, 0.96], [0.55, 0.45]]))
    r = reliability_bins(logits, np.array([0, 0, 0]), bins=10)
    np.testing.assert_allclose(r["edges"], np.linspace(0, 1, 11))
    assert r["count"].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    assert r["confidence"][9] == pytest.approx(0.94) and r["accuracy"][9] == 0.5
    assert r["confidence"][5] == pytest.approx(0.55) and r["accuracy"][5] == 1.0
    empty = r["count"] == 0
    assert np.isnan(r["confidence"][empty]).all() and np.isnan(r["accuracy"][empty]).all()
    # ECE: (2 * |0.5 - 0.94| + 1 * |1 - 0.55|) / 3
    assert calibration_error(r) == pytest.approx((2 * 0.44 + 0.45) / 3)


def test_reliability_bins_hold_every_image_in_the_bin_of_its_confidence():
    logits, labels = synthetic_predictions(5000, 0.2)
    r = reliability_bins(logits, labels)
    count, conf = r["count"], r["confidence"]
    ok = count > 0
    assert len(r["edges"]) == 16 and count.sum() == len(labels) and ok.sum() > 5
    assert (r["edges"][:-1][ok] < conf[ok]).all() and (conf[ok] <= r["edges"][1:][ok]).all()
    # The ECE is the count-weighted gap of the bins, and these predictions are over-confident.
    gap = float((count[ok] * np.abs(r["accuracy"][ok] - conf[ok])).sum() / count.sum())
    assert calibration_error(r) == pytest.approx(gap, abs=1e-12) == ece(logits, labels) and gap > 0.15
