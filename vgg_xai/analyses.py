"""The analyses of one trial's interpretation, each a function over one `Inputs` that returns a
`Result`: its arrays (for arrays.h5), its summary values (metrics.json ``summary``), its section of
metrics.json, what it measured and found degenerate (interpret.degenerate) and, where it was not
run, the one-line reason. `postprocess.compute` loads the inputs once and composes them.

An analysis that a degenerate result makes meaningless is skipped, not run: its arrays and section
are left out and its summary values are None (results.SUMMARY_KEYS names them per analysis).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from . import checkpoint, features, stats, trial_folder
from .config import TrialConfig
from .data import DeviceSplit, load_cache
from .interpret import activations, cam, clusters, degenerate, embedding, faithfulness, filters, metrics, probes
from .interpret import sanity
from .model import build_model
from .results import SUMMARY_KEYS

if TYPE_CHECKING:  # the settings are post-processing's (saved in metrics.json); only their fields are read here
    from .postprocess import Settings


@dataclass
class Inputs:
    """What the analyses of one trial read: its models, the prepared test split, its feature dump, the
    probe images and the settings. The test split is the whole prepared one (the images every trial
    is shown and scored on); the dump holds the spec's test set."""

    settings: Settings
    trained: torch.nn.Module
    init: torch.nn.Module  # the weights before training
    test: DeviceSplit
    test_x: np.ndarray  # the test split's uint8 images (N, 3, H, W), as test.images on the host
    test_y: np.ndarray
    classes: list[str]
    dump: features.FeatureDump
    probes: np.ndarray  # indices into the test split
    probe_x: torch.Tensor  # normalized, on the device
    probe_predictions: np.ndarray
    feature_checks: dict[str, Any]  # interpret.degenerate's measures of the dump
    feature_findings: list[str]  # and what it found degenerate, one line each
    threads: int | None = None

    def images(self, idx: np.ndarray | slice) -> torch.Tensor:
        """Test images, normalized, on the device."""
        return _images(self.test, idx)

    def predict(self, x: torch.Tensor) -> np.ndarray:
        return _predict(self.trained, x)

    def balanced(self, per_class: int) -> np.ndarray:
        """The same class-balanced test images for every trial (at most as many as the smallest class has)."""
        per_class = min(per_class, int(np.bincount(self.test_y).min()))
        return probes.probe_indices(self.test_y, seed=self.settings.probe_seed, per_class=per_class)


@dataclass
class Result:
    """One analysis's output. ``skipped``: why it was not run (None where it was)."""

    arrays: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] | None = None  # its section of metrics.json
    skipped: str | None = None
    checks: dict[str, Any] = field(default_factory=dict)  # measured by interpret.degenerate
    findings: list[str] = field(default_factory=list)  # degenerate findings, one line each


def _skipped(analysis: str, why: str, checks: dict[str, Any] | None = None) -> Result:
    return Result(summary=dict.fromkeys(SUMMARY_KEYS.get(analysis, ())), skipped=why, checks=checks or {})


def load_inputs(trial_dir: Path, settings: Settings, threads: int | None = None) -> Inputs:
    """The trial's models (trained and initial), its test split on its device and its feature dump."""
    from .train import resolve_device

    config = trial_folder.read_config(trial_dir)
    if config is None:
        raise FileNotFoundError(f"{trial_dir / trial_folder.CONFIG}: no such file")
    cfg = TrialConfig.from_dict(config)
    device = resolve_device(cfg.device)
    prep = load_cache(cfg.data)
    test_x, test_y = prep.splits["test"]

    def load(name: str) -> torch.nn.Module:
        net = build_model(cfg)
        net.load_state_dict(checkpoint.load(trial_dir / name)["model"])
        # channels_last: the convolutions' fast layout, on the CPU (oneDNN) as on a GPU; forwards
        # of a bn model (width 0.125) ran 1.6x faster with it on one core (measured).
        return net.to(device, memory_format=torch.channels_last).eval()

    trained, test = load("checkpoint.pt"), DeviceSplit(test_x, test_y, prep.mean, prep.std, device)
    idx = probes.probe_indices(test_y, seed=settings.probe_seed, per_class=settings.probes_per_class)
    x = _images(test, idx)
    dump = features.read(trial_dir / "features.h5")
    checks, findings = degenerate.feature_checks(dump.features, dump.logits, dump.predictions, prep.classes)
    return Inputs(settings=settings, trained=trained, init=load("checkpoint_init.pt"), test=test, test_x=test_x,
                  test_y=test_y, classes=prep.classes, dump=dump, probes=idx, probe_x=x,
                  probe_predictions=_predict(trained, x), feature_checks=checks, feature_findings=findings,
                  threads=threads)


def _images(test: DeviceSplit, idx: np.ndarray | slice) -> torch.Tensor:
    if isinstance(idx, np.ndarray):
        idx = torch.from_numpy(idx)
    return test.normalize(test.images[idx].float().div_(255))


def _predict(net: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([net(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)]).cpu().numpy()


def probe_arrays(inp: Inputs) -> dict[str, Any]:
    return {"indices": inp.probes, "images": inp.test_x[inp.probes].transpose(0, 2, 3, 1),
            "labels": inp.test_y[inp.probes], "predictions": inp.probe_predictions}


# ---------------------------------------------------------------------------- the analyses

def filters_and_maps(inp: Inputs) -> Result:
    """Filters and feature maps of the first and the last conv layer, untrained beside trained, and
    the first probe image through every conv layer."""
    c, x, trained = inp.settings.channels, inp.probe_x, inp.trained
    first, last = trained.conv_layers()[0][0], trained.last_conv()[0]
    weights, maps = {}, {}
    for tag, net in (("init", inp.init), ("trained", trained)):
        # Raw weights: the figure puts both models on one colour scale.
        weights[tag] = {"first": filters.conv_weights(net, first), "last": filters.conv_weights(net, last)[:c, :c]}
        maps[tag] = {"first": filters.feature_maps(net, first, x)[:, :c],
                     "last": filters.feature_maps(net, last, x)[:, :c]}
    maps["layers"] = [first, last]
    through = filters.through_every_conv(trained, x[0])
    return Result(arrays={"filters": weights, "fmaps": maps,
                          "through": {"layers": list(through), **{n: m[:c] for n, m in through.items()}}})


def bn_histograms(inp: Inputs) -> Result:
    """BatchNorm input and output histograms over a fixed batch (the first test images); none without BatchNorm."""
    hist = activations.bn_histograms(inp.trained, inp.images(slice(0, inp.settings.bn_batch)))
    return Result(arrays={"bn": {"layers": list(hist), **hist}} if hist else {})


def class_maps(inp: Inputs) -> Result:
    """Every CAM method's maps of the probe images (plain CAM only where the head is one linear layer);
    skipped where every method's maps are degenerate."""
    s, trained = inp.settings, inp.trained
    methods = list(s.cam_methods) + (["cam"] if len(trained.head) == 0 else [])
    maps = {"methods": methods, "layer": cam.default_layer(trained),
            **{m: cam.cam(trained, inp.probe_x, m, targets=inp.probe_predictions) for m in methods}}
    checks, flat = {}, {}
    for m in methods:
        checks.update(degenerate.map_checks(maps[m], f"cam_{m}"))
        if degenerate.degenerate_maps(checks, f"cam_{m}"):
            flat[m] = degenerate.maps_finding(checks, f"cam_{m}")
    found = ", ".join(f"{m} {v}" for m, v in flat.items())
    return Result(arrays={"cam": maps}, details={"method": s.cam_method, "methods": methods, "layer": maps["layer"]},
                  checks=checks, findings=[f"class activation maps of the probe images: {found}"] if flat else [],
                  skipped=f"every method's maps of the probe images are degenerate ({found})"
                  if flat and len(flat) == len(methods) else None)


@dataclass
class ScoredMaps:
    """The class-balanced test images a map method is scored on, their predicted classes (the maps'
    targets) and the trained model's maps of them."""

    indices: np.ndarray
    x: torch.Tensor
    targets: np.ndarray
    maps: np.ndarray
    checks: dict[str, Any]


# Why an analysis that scores maps is not run: for a model whose output ignores the image, and for
# degenerate maps (a format with the fields method, n and finding).
MAP_SKIPS = {
    "faithfulness": ("deleting or inserting pixels cannot change it",
                     "{method} maps of the {n} faithfulness images: {finding}; no pixel order to test"),
    "sanity": ("its maps carry no information about the image to randomize",
               "trained {method} maps of the {n} sanity-check images: {finding}; nothing to correlate"),
}


def scored_maps(inp: Inputs, analysis: str, per_class: int) -> ScoredMaps | Result:
    """The opening that faithfulness and the randomization check share: their images and maps, or the
    Result that skips ``analysis`` (MAP_SKIPS says why)."""
    s = inp.settings
    insensitive, flat = MAP_SKIPS[analysis]
    if degenerate.insensitive(inp.feature_checks):
        return _skipped(analysis, f"the model's output is the same for every test image: {insensitive}")
    idx = inp.balanced(per_class)
    x = inp.images(idx)
    targets = inp.predict(x)
    maps = cam.cam(inp.trained, x, s.cam_method, targets=targets)
    checks = degenerate.map_checks(maps, analysis)
    if degenerate.degenerate_maps(checks, analysis):
        finding = degenerate.maps_finding(checks, analysis)
        return _skipped(analysis, flat.format(method=s.cam_method, n=len(idx), finding=finding), checks)
    return ScoredMaps(idx, x, targets, maps, checks)


def deletion_insertion(inp: Inputs) -> Result:
    """Faithfulness: deletion and insertion AUC of the scored map method against a random map on the same images."""
    s = inp.settings
    scored = scored_maps(inp, "faithfulness", s.faithfulness_per_class)
    if isinstance(scored, Result):
        return scored
    trained, x, targets = inp.trained, scored.x, scored.targets
    # The random baseline map is drawn once (fixed seed, the same for every trial); it also
    # orders the pixels a map ties on (faithfulness.pixel_order).
    rnd = np.random.default_rng(s.seed).random(scored.maps.shape)
    curves: dict[str, Any] = {"indices": scored.indices, "targets": targets}
    summary: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS["faithfulness"])
    for mode in ("deletion", "insertion"):
        share, probs = faithfulness.perturbation_curves(trained, x, scored.maps, targets, mode, s.faithfulness_steps,
                                                        tiebreak=rnd)
        _, probs_rnd = faithfulness.perturbation_curves(trained, x, rnd, targets, mode, s.faithfulness_steps)
        curves.update({"x": share, mode: probs, f"{mode}_random": probs_rnd})
        aucs = faithfulness.curve_auc(probs), faithfulness.curve_auc(probs_rnd)
        for key, auc in zip((f"{mode}_auc", f"{mode}_auc_random"), aucs):
            summary[key], summary[f"{key}_se"] = float(auc.mean()), float(auc.std(ddof=1) / np.sqrt(len(auc)))
        # the map against the random map on the same image: a paired difference
        pair = stats.paired(*aucs, higher_is_better=mode == "insertion")
        summary.update({f"{mode}_vs_random": pair["diff"], f"{mode}_vs_random_se": pair["se"],
                        f"{mode}_wins": pair["wins"], f"{mode}_vs_random_p": pair["p"]})
    summary["faithfulness_n_images"] = len(scored.indices)
    details = {"method": s.cam_method, "n_images": len(scored.indices), "steps": s.faithfulness_steps,
               "flat_maps": scored.checks["faithfulness_flat_maps"], "baseline": "zero",
               "ties": "by the random baseline map, then row-major"}
    return Result(arrays={"faithfulness": curves}, summary=summary, details=details, checks=scored.checks)


# What the randomization check's section of metrics.json keeps of interpret.sanity's answer.
SANITY_DETAILS = ("layers", "spearman", "spearman_std", "abs_spearman", "abs_spearman_std", "floor", "floor_std",
                  "floor_n", "abs_floor", "abs_floor_std", "abs_floor_n", "spearman_per_draw", "n_pairs",
                  "n_degenerate", "n_compared", "n_draws", "n_images", "flat_trained")


def randomization(inp: Inputs) -> Result:
    """The cascading model-randomization (sanity) check of the scored map method."""
    s = inp.settings
    scored = scored_maps(inp, "sanity", s.sanity_per_class)
    if isinstance(scored, Result):
        return scored
    sc = sanity.randomization_check(inp.trained, scored.x, s.cam_method, draws=s.sanity_draws, seed=s.seed,
                                    targets=scored.targets)
    arrays = {"layers": sc["layers"], "spearman": sc["spearman"], "spearman_std": sc["spearman_std"],
              "spearman_per_draw": sc["spearman_per_draw"], "maps": sc["maps"][:, 0],
              "image": inp.test_x[scored.indices[0]].transpose(1, 2, 0), "indices": scored.indices}
    summary = dict(sanity_rho=sc["spearman"][-1], sanity_rho_std=sc["spearman_std"][-1],
                   sanity_floor=sc["floor"], sanity_floor_std=sc["floor_std"],
                   sanity_abs_rank_rho=sc["abs_spearman"][-1], sanity_abs_rank_rho_std=sc["abs_spearman_std"][-1],
                   sanity_abs_floor=sc["abs_floor"], sanity_abs_floor_std=sc["abs_floor_std"],
                   sanity_n_draws=sc["n_draws"], sanity_n_images=sc["n_images"],
                   sanity_n_pairs=sc["n_compared"], sanity_n_degenerate=int(sc["n_degenerate"][-1]))
    details = {k: sc[k] for k in SANITY_DETAILS}
    details.update(method=s.cam_method, statistics={
        "spearman": "Spearman correlation of the rectified maps, trained against randomized",
        "abs_spearman": "ABS: Spearman correlation of the absolute values of the unrectified maps",
        "floor": "each statistic between the trained maps of different images (image i against i - 1)"})
    return Result(arrays={"sanity": arrays}, summary=summary, details=details, checks=scored.checks)


@dataclass
class Components:
    """The feature vectors' principal components that t-SNE and the mixture start from (one PCA for
    both), or why there are none; ``finding``: what computing them found degenerate."""

    z: np.ndarray | None
    why_not: str | None = None
    finding: str | None = None


def principal_components(inp: Inputs) -> Components:
    s = inp.settings
    if degenerate.collapsed(inp.feature_checks):
        return Components(None, inp.feature_findings[0])  # the feature finding comes first
    # t-SNE starts from the first 50 components, the GMM from the first pca_dim.
    z = embedding.pca(inp.dump.features, max(50, s.pca_dim), s.seed)
    if not np.isfinite(z).all():
        why = "the principal components of the feature vectors are not finite"
        return Components(None, why, why)
    return Components(z)


def tsne(inp: Inputs, pcs: Components) -> Result:
    """t-SNE of the test-set feature vectors (the spec's test set), from their first 50 principal components."""
    s = inp.settings
    if pcs.z is None:
        why = pcs.why_not if pcs.finding else f"{pcs.why_not}: no neighbourhoods to embed"
        return Result(skipped=why, findings=[pcs.finding] if pcs.finding else [])
    method = embedding.tsne_method(len(pcs.z), s.tsne_method)
    plane = embedding.tsne(pcs.z[:, :50], seed=s.seed, perplexity=s.perplexity, n_jobs=inp.threads, method=method)
    return Result(arrays={"embedding": {"tsne": plane}},
                  details={"method": method, "n": len(pcs.z), "perplexity": s.perplexity})


def scored_k_reason(k: int, n_classes: int) -> str:
    """Why the mixture that is shown and scored has ``k`` components, whatever k the BIC scan prefers."""
    if k == n_classes:
        return (f"one component per class: ARI, NMI and purity compare the clusters with the {n_classes} classes; "
                "the BIC scan's lowest k is shown, not scored")
    return f"k = {k} as set (Settings.gmm_k); the BIC scan's lowest k is shown, not scored"


def mixture(inp: Inputs, pcs: Components) -> Result:
    """A Gaussian mixture (EM) on the principal components, scored against the labels, and the BIC scan."""
    s, labels = inp.settings, inp.dump.labels
    if pcs.z is None:
        return _skipped("gmm", pcs.why_not if pcs.finding else f"{pcs.why_not}: nothing to cluster")
    most = max(s.gmm_k, *s.bic_ks)
    distinct = inp.feature_checks["distinct_features"]
    if distinct < most:
        return _skipped("gmm", f"only {distinct} distinct feature vectors: too few for mixtures of up to {most} "
                               "components")
    z = pcs.z[:, : s.pca_dim]
    # One BLAS thread: EM's matrices are at most pca_dim wide, too small for threads to pay, and
    # with threads every fit was 10-35x slower on a busy 2-core machine (measured). The BIC
    # scan's fits run side by side in threads instead.
    with threadpool_limits(1, user_api="blas"):
        gmm = clusters.fit_gmm(z, s.gmm_k, "full", s.seed)
        sample = np.random.default_rng(s.seed).permutation(len(z))[: s.bic_points]
        scan = clusters.bic_scan(z[sample], s.bic_ks, s.bic_types, s.seed,
                                 n_jobs=inp.threads or embedding.available_cpus())
    used = len(np.unique(gmm["labels"]))
    arrays = {"embedding": {"gmm": gmm["labels"],
                            "contingency": clusters.contingency(labels, gmm["labels"], len(inp.classes))},
              "bic": {"bic": scan["bic"], "ks": scan["ks"], "covariance_types": scan["covariance_types"]}}
    details = {"k": s.gmm_k, "covariance_type": "full", "k_reason": scored_k_reason(s.gmm_k, len(inp.classes)),
               "pca_dim": int(z.shape[1]), "converged": gmm["converged"], "n_iter": gmm["n_iter"],
               "bic": gmm["bic"], "bic_best": list(scan["best"]), "clusters_used": used}
    one = [f"the Gaussian mixture puts all {len(z)} feature vectors in one cluster"] if used == 1 else []
    return Result(arrays=arrays, summary=clusters.cluster_scores(labels, gmm["labels"]), details=details,
                  checks={"gmm_clusters_used": used}, findings=one)


def classification(inp: Inputs) -> Result:
    """Test accuracy, the confusion matrix, per-class accuracy, and calibration: the reliability bins and the ECE."""
    d, n = inp.dump, len(inp.classes)
    per_class_acc = metrics.per_class_accuracy(d.labels, d.predictions, n)
    bins = metrics.reliability_bins(d.logits, d.labels)
    summary = {"test_acc": float((d.predictions == d.labels).mean()), "ece": metrics.calibration_error(bins)}
    return Result(arrays={"metrics": {"confusion": metrics.confusion(d.labels, d.predictions, n),
                                      "per_class_accuracy": per_class_acc, "reliability": bins}}, summary=summary,
                  details=dict(zip(inp.classes, per_class_acc)))


def merge(*trees: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts merged into one (a key that two hold as dicts is merged in turn)."""
    out: dict[str, Any] = {}
    for tree in trees:
        for k, v in tree.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
