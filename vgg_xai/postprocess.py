"""The post-processing job: per trial, the interpretation suite; per sweep, the aggregate tables,
the sweep figures and report.html. Idempotent; runs at the end of every sweep and as SLURM's job
after the sweep job.

Per trial it writes ``trials/<id>/interpret/``: figures (PNG), ``arrays.h5`` (everything the
figures are drawn from) and, last, ``metrics.json``, which marks the folder complete. A trial is
skipped while its metrics.json is newer than its checkpoint and features and was made with the
same settings. A lock file per trial makes two post-processing runs at once safe: the second
waits, then finds the trial up to date. Every file is written atomically.

A degenerate trial (collapsed features, one predicted class, maps that are all zero) is a result,
not an error: `compute` detects it where the numbers are made (interpret.degenerate), records what
it found in metrics.json ``degenerate`` and skips the analyses it makes meaningless, each with a
one-line reason in ``skipped``; their summary values are null and their figures are not drawn.

metrics.json (this module writes it; JSON null wherever a value was not computed, never NaN):
    summary      the scalars the tables read: test_acc, ece, ari, nmi, purity; deletion_auc,
                 insertion_auc and their random-map baselines (deletion_auc_random, ...), each
                 with its standard error (``*_se``); the map against the random map on the same
                 image (``*_vs_random``: the mean paired difference, its ``_se`` and ``_p`` of a
                 paired t-test; ``*_wins``: the share of images where the map is the better one)
                 and faithfulness_n_images; the randomization check's final step: sanity_rho
                 (rectified maps) and sanity_abs_rank_rho (ABS: absolute values of the
                 unrectified maps) with ``*_std``, their noise floors sanity_floor and
                 sanity_abs_floor (the same statistic between trained maps of different images)
                 with ``*_std``, sanity_n_draws, sanity_n_images, sanity_n_pairs (draws x images)
                 and sanity_n_degenerate (of those pairs, left out: a flat map)
    degenerate   {"detected": bool, "reasons": [one line each], "checks": {name: number or bool}}
    skipped      {analysis: one-line reason}; analyses: cam, faithfulness, sanity, tsne, gmm
    faithfulness, sanity, tsne, gmm   the details of each analysis (None where it was skipped); gmm's ``k``
                 and ``covariance_type`` are the mixture shown and scored, ``k_reason`` says why that k,
                 and ``bic_best`` is the BIC scan's lowest (k, type), which is drawn but not scored
    settings, cam, per_class_accuracy, probes, classes, device, seconds, cpu_seconds
    images       which test images each analysis reads (IMAGES_RULE)
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .atomic import atomic_write_bytes, atomic_write_text
from .errors import UserError
from .locks import locked
from .results import FAITHFULNESS_KEYS, SANITY_KEYS, trial_status, write_tables
from .trial_folder import TESTED, trial_dirs

SCHEMA = "vgg-xai/interpret/2"  # 2: faithfulness paired with the random map; the ABS randomization statistic


@dataclass(frozen=True)
class Settings:
    """What the interpretation of a trial computes; saved in its metrics.json."""

    probe_seed: int = 0  # the same probe images for every trial of a sweep
    probes_per_class: int = 1
    cam_method: str = "gradcam"  # the map of the faithfulness and sanity checks and the sweep grid
    cam_methods: tuple[str, ...] = ("gradcam", "hirescam", "gradcam++")  # plain CAM is added for head=linear
    bn_batch: int = 256  # the fixed batch of the BatchNorm histograms: the first test images
    channels: int = 16  # feature maps and filters kept per layer
    pca_dim: int = 50  # the GMM is fitted on this many principal components
    gmm_k: int = 10
    bic_ks: tuple[int, ...] = tuple(range(2, 16))
    bic_types: tuple[str, ...] = ("full", "diag", "spherical", "tied")
    bic_points: int = 5000  # the BIC scan fits on a seeded sample of at most this many vectors
    faithfulness_steps: int = 16
    faithfulness_per_class: int = 26  # deletion/insertion over 26 test images per class (260), the same for every trial
    sanity_per_class: int = 5  # the randomization check over 5 test images per class (50)
    sanity_draws: int = 3  # independent draws of the random weights
    perplexity: float = 30.0
    tsne_method: str = "auto"  # the faster one here: Barnes-Hut unless openTSNE has FFTW (embedding.tsne_method)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples as lists, as they read back from JSON


# ---------------------------------------------------------------------------- the arrays file

def write_arrays(path: Path, tree: dict[str, Any]) -> None:
    """A nested dict of arrays (and strings/lists as attributes) as one HDF5 file, atomically."""

    def put(group: h5py.Group, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                put(group.create_group(k), v)
            elif isinstance(v, (str, list, tuple)) and not isinstance(v, np.ndarray):
                group.attrs[k] = json.dumps(list(v) if isinstance(v, tuple) else v)
            else:
                group.create_dataset(k, data=np.asarray(v), compression="gzip", compression_opts=1)

    def _write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["schema"] = SCHEMA
            put(f, tree)

    atomic_write_bytes(path, _write)


def read_arrays(path: str | Path) -> dict[str, Any]:
    """What `write_arrays` wrote: datasets as arrays, attributes decoded from JSON."""

    def get(group: h5py.Group) -> dict[str, Any]:
        out: dict[str, Any] = {k: json.loads(v) for k, v in group.attrs.items() if k != "schema"}
        for k, v in group.items():
            out[k] = get(v) if isinstance(v, h5py.Group) else v[()]
        return out

    with h5py.File(path, "r") as f:
        if f.attrs.get("schema") != SCHEMA:
            raise ValueError(f"{path}: not a {SCHEMA} file")
        return get(f)


# ---------------------------------------------------------------------------- one trial

def up_to_date(trial_dir: Path, settings: Settings) -> bool:
    """metrics.json exists, is newer than the checkpoint and features, and used these settings, and both it
    and arrays.h5 read (a file cut short or damaged is redone)."""
    metrics = trial_dir / "interpret" / "metrics.json"
    if not metrics.is_file():
        return False
    inputs = [trial_dir / "checkpoint.pt", trial_dir / "features.h5"]
    if any(p.is_file() and p.stat().st_mtime_ns > metrics.stat().st_mtime_ns for p in inputs):
        return False
    try:
        saved = json.loads(metrics.read_text())
        with h5py.File(trial_dir / "interpret" / "arrays.h5", "r") as f:  # cut short: it does not open
            arrays_schema = f.attrs.get("schema")
    except (ValueError, OSError):  # a damaged metrics.json or arrays.h5: redo it
        return False
    return isinstance(saved, dict) and saved.get("schema") == SCHEMA == arrays_schema \
        and saved.get("settings") == settings.to_dict()


def interpret_trial(trial_dir: str | Path, settings: Settings = Settings(), threads: int | None = None,
                    force: bool = False) -> dict[str, Any]:
    """Run the interpretation suite on one finished trial; returns ``{"trial_id", "skipped", "seconds"}``.

    Safe to call from several processes at once (one computes, the others wait and skip).
    """
    trial_dir = Path(trial_dir)
    with locked(trial_dir / "interpret" / ".lock"):
        if not force and up_to_date(trial_dir, settings):
            return {"trial_id": trial_dir.name, "skipped": True, "seconds": 0.0}
        t0 = time.perf_counter()
        if threads:
            import torch

            torch.set_num_threads(threads)
        out = trial_dir / "interpret"
        # An older result is not this one: should this run die half-way, the trial has none.
        (out / "metrics.json").unlink(missing_ok=True)
        arrays, metrics = compute(trial_dir, settings, threads)
        drawn = draw_trial(out, arrays, metrics, _history(trial_dir))
        for old in set(out.glob("*.png")) - set(drawn):  # a figure of an analysis skipped this time
            old.unlink()
        write_arrays(out / "arrays.h5", arrays)
        metrics["seconds"]["total"] = time.perf_counter() - t0
        # Last: marks it complete. compute leaves no NaN in it: a value not computed is None.
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False))
        (out / "error.txt").unlink(missing_ok=True)
        return {"trial_id": trial_dir.name, "skipped": False, "seconds": metrics["seconds"]["total"]}


def _history(trial_dir: Path) -> dict[str, np.ndarray]:
    import csv

    rows = list(csv.DictReader((trial_dir / "history.csv").open()))
    cols = ("epoch", "train_loss", "valid_loss", "train_acc", "valid_acc")
    return {c: np.asarray([float(r[c]) if r[c] not in ("", "nan") else np.nan for r in rows]) for c in cols}


def compute(trial_dir: Path, s: Settings, threads: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything the suite measures for one trial: (arrays for arrays.h5, metrics for metrics.json).

    Degenerate results are checked where they are made (`interpret.degenerate`): what was found
    goes to ``metrics["degenerate"]`` (``detected``, one line per finding in ``reasons``, the
    measured ``checks``); an analysis they make meaningless is not run: its one-line reason goes
    to ``metrics["skipped"]``, its arrays are left out, its summary values and its section of
    metrics.json are None.
    """
    import torch
    from threadpoolctl import threadpool_limits

    from . import checkpoint, features
    from .config import TrialConfig
    from .data import DeviceSplit, load_cache
    from .interpret import activations, cam, clusters, degenerate, embedding, faithfulness, filters, metrics, probes
    from .interpret import sanity
    from . import stats
    from .interpret.embedding import available_cpus
    from .model import build_model
    from .train import resolve_device

    secs: dict[str, float] = {}
    cpu_secs: dict[str, float] = {}  # CPU time of this process (all its threads): what a busy machine does not inflate
    tick, cpu_tick = time.perf_counter(), time.process_time()

    def lap(name: str) -> None:
        nonlocal tick, cpu_tick
        now, cpu_now = time.perf_counter(), time.process_time()
        secs[name], cpu_secs[name] = now - tick, cpu_now - cpu_tick
        tick, cpu_tick = now, cpu_now

    skipped: dict[str, str] = {}

    def skip(analysis: str, reason: str) -> None:
        skipped.setdefault(analysis, reason)

    cfg = TrialConfig.from_dict(json.loads((trial_dir / "config.json").read_text()))
    device = resolve_device(cfg.device)
    prep = load_cache(cfg.data)
    test_x, test_y = prep.splits["test"]
    test = DeviceSplit(test_x, test_y, prep.mean, prep.std, device)
    classes = prep.classes

    def load(name: str) -> torch.nn.Module:
        net = build_model(cfg)
        net.load_state_dict(checkpoint.load(trial_dir / name)["model"])
        # channels_last: the convolutions' fast layout, on the CPU (oneDNN) as on a GPU; forwards
        # of a bn model (width 0.125) ran 1.6x faster with it on one core (measured).
        return net.to(device, memory_format=torch.channels_last).eval()

    def test_images(idx: np.ndarray | slice) -> torch.Tensor:
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(idx)
        return test.normalize(test.images[idx].float().div_(255))

    def predict(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([trained(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)]).cpu().numpy()

    def balanced(per_class: int) -> np.ndarray:
        """The same class-balanced test images for every trial (at most as many as the smallest class has)."""
        return probes.probe_indices(test_y, seed=s.probe_seed, per_class=min(per_class, int(np.bincount(test_y).min())))

    trained, init = load("checkpoint.pt"), load("checkpoint_init.pt")
    dump = features.read(trial_dir / "features.h5")
    checks, reasons = degenerate.feature_checks(dump.features, dump.logits, dump.predictions, classes)
    if degenerate.insensitive(checks):
        why = "the model's output is the same for every test image"
        skip("faithfulness", f"{why}: deleting or inserting pixels cannot change it")
        skip("sanity", f"{why}: its maps carry no information about the image to randomize")
    idx = probes.probe_indices(test_y, seed=s.probe_seed, per_class=s.probes_per_class)
    x = test_images(idx)
    preds = predict(x)
    a: dict[str, Any] = {"probes": {"indices": idx, "images": test_x[idx].transpose(0, 2, 3, 1),
                                    "labels": test_y[idx], "predictions": preds}, "classes": classes}
    lap("load")

    # Filters and feature maps: the first and the last conv layer, untrained beside trained.
    c = s.channels
    first, last = trained.conv_layers()[0][0], trained.last_conv()[0]
    a["filters"], a["fmaps"] = {}, {}
    for tag, net in (("init", init), ("trained", trained)):
        # Raw weights: the figure puts both models on one colour scale.
        a["filters"][tag] = {"first": filters.conv_weights(net, first), "last": filters.conv_weights(net, last)[:c, :c]}
        a["fmaps"][tag] = {"first": filters.feature_maps(net, first, x)[:, :c],
                           "last": filters.feature_maps(net, last, x)[:, :c]}
    a["fmaps"]["layers"] = [first, last]
    through = filters.through_every_conv(trained, x[0])
    a["through"] = {"layers": list(through), **{n: m[:c] for n, m in through.items()}}
    lap("filters")

    hist = activations.bn_histograms(trained, test_images(slice(0, s.bn_batch)))
    if hist:
        a["bn"] = {"layers": list(hist), **hist}
    lap("bn_histograms")

    methods = list(s.cam_methods) + (["cam"] if len(trained.head) == 0 else [])
    a["cam"] = {"methods": methods, "layer": cam.default_layer(trained),
                **{m: cam.cam(trained, x, m, targets=preds) for m in methods}}
    flat = {}
    for m in methods:
        checks.update(degenerate.map_checks(a["cam"][m], f"cam_{m}"))
        if degenerate.degenerate_maps(checks, f"cam_{m}"):
            flat[m] = degenerate.maps_finding(checks, f"cam_{m}")
    if flat:
        found = ", ".join(f"{m} {v}" for m, v in flat.items())
        reasons.append(f"class activation maps of the probe images: {found}")
        if len(flat) == len(methods):
            skip("cam", f"every method's maps of the probe images are degenerate ({found})")
    lap("cam")

    summary: dict[str, Any] = dict.fromkeys(FAITHFULNESS_KEYS + SANITY_KEYS)
    f_meta = None
    if "faithfulness" not in skipped:
        fidx = balanced(s.faithfulness_per_class)
        fx = test_images(fidx)
        ft = predict(fx)
        fmaps = cam.cam(trained, fx, s.cam_method, targets=ft)
        checks.update(degenerate.map_checks(fmaps, "faithfulness"))
        if degenerate.degenerate_maps(checks, "faithfulness"):
            skip("faithfulness", f"{s.cam_method} maps of the {len(fidx)} faithfulness images: "
                                 f"{degenerate.maps_finding(checks, 'faithfulness')}; no pixel order to test")
        else:
            # The random baseline map is drawn once (fixed seed, the same for every trial); it also
            # orders the pixels a map ties on (faithfulness.pixel_order).
            rnd = np.random.default_rng(s.seed).random(fmaps.shape)
            f: dict[str, Any] = {"indices": fidx, "targets": ft}
            for mode in ("deletion", "insertion"):
                share, probs = faithfulness.perturbation_curves(trained, fx, fmaps, ft, mode, s.faithfulness_steps,
                                                                tiebreak=rnd)
                _, probs_rnd = faithfulness.perturbation_curves(trained, fx, rnd, ft, mode, s.faithfulness_steps)
                f.update({"x": share, mode: probs, f"{mode}_random": probs_rnd})
                aucs = faithfulness.curve_auc(probs), faithfulness.curve_auc(probs_rnd)
                for key, auc in zip((f"{mode}_auc", f"{mode}_auc_random"), aucs):
                    summary[key], summary[f"{key}_se"] = float(auc.mean()), float(auc.std(ddof=1) / np.sqrt(len(auc)))
                # the map against the random map on the same image: a paired difference
                pair = stats.paired(*aucs, higher_is_better=mode == "insertion")
                summary.update({f"{mode}_vs_random": pair["diff"], f"{mode}_vs_random_se": pair["se"],
                                f"{mode}_wins": pair["wins"], f"{mode}_vs_random_p": pair["p"]})
            summary["faithfulness_n_images"] = len(fidx)
            a["faithfulness"] = f
            f_meta = {"method": s.cam_method, "n_images": len(fidx), "steps": s.faithfulness_steps,
                      "flat_maps": checks["faithfulness_flat_maps"], "baseline": "zero",
                      "ties": "by the random baseline map, then row-major"}
    lap("faithfulness")

    sc_meta = None
    if "sanity" not in skipped:
        sidx = balanced(s.sanity_per_class)
        sx = test_images(sidx)
        st = predict(sx)
        checks.update(degenerate.map_checks(cam.cam(trained, sx, s.cam_method, targets=st), "sanity"))
        if degenerate.degenerate_maps(checks, "sanity"):
            skip("sanity", f"trained {s.cam_method} maps of the {len(sidx)} sanity-check images: "
                           f"{degenerate.maps_finding(checks, 'sanity')}; nothing to correlate")
        else:
            sc = sanity.randomization_check(trained, sx, s.cam_method, draws=s.sanity_draws, seed=s.seed, targets=st)
            a["sanity"] = {"layers": sc["layers"], "spearman": sc["spearman"], "spearman_std": sc["spearman_std"],
                           "spearman_per_draw": sc["spearman_per_draw"], "maps": sc["maps"][:, 0],
                           "image": test_x[sidx[0]].transpose(1, 2, 0), "indices": sidx}
            summary.update(sanity_rho=sc["spearman"][-1], sanity_rho_std=sc["spearman_std"][-1],
                           sanity_floor=sc["floor"], sanity_floor_std=sc["floor_std"],
                           sanity_abs_rank_rho=sc["abs_spearman"][-1], sanity_abs_rank_rho_std=sc["abs_spearman_std"][-1],
                           sanity_abs_floor=sc["abs_floor"], sanity_abs_floor_std=sc["abs_floor_std"],
                           sanity_n_draws=sc["n_draws"], sanity_n_images=sc["n_images"],
                           sanity_n_pairs=sc["n_compared"], sanity_n_degenerate=int(sc["n_degenerate"][-1]))
            sc_meta = {k: sc[k] for k in ("layers", "spearman", "spearman_std", "abs_spearman", "abs_spearman_std",
                                          "floor", "floor_std", "floor_n", "abs_floor", "abs_floor_std", "abs_floor_n",
                                          "spearman_per_draw", "n_pairs", "n_degenerate", "n_compared", "n_draws",
                                          "n_images", "flat_trained")}
            sc_meta.update(method=s.cam_method, statistics={
                "spearman": "Spearman correlation of the rectified maps, trained against randomized",
                "abs_spearman": "ABS: Spearman correlation of the absolute values of the unrectified maps",
                "floor": "each statistic between the trained maps of different images (image i against i - 1)"})
    lap("sanity")

    # One PCA serves both: t-SNE starts from the first 50 components, the GMM from the first pca_dim.
    z = None
    if degenerate.collapsed(checks):
        why = reasons[0]  # the feature finding comes first
        skip("tsne", f"{why}: no neighbourhoods to embed")
        skip("gmm", f"{why}: nothing to cluster")
    else:
        z = embedding.pca(dump.features, max(50, s.pca_dim), s.seed)
        if not np.isfinite(z).all():
            reasons.append("the principal components of the feature vectors are not finite")
            skip("tsne", "the principal components of the feature vectors are not finite")
            skip("gmm", "the principal components of the feature vectors are not finite")
    a["embedding"] = {"labels": dump.labels}
    tsne_meta = None
    if "tsne" not in skipped:
        method = embedding.tsne_method(len(z), s.tsne_method)
        a["embedding"]["tsne"] = embedding.tsne(z[:, :50], seed=s.seed, perplexity=s.perplexity, n_jobs=threads,
                                                method=method)
        tsne_meta = {"method": method, "n": len(z), "perplexity": s.perplexity}
    lap("tsne")

    gmm_meta = None
    scores: dict[str, Any] = {"ari": None, "nmi": None, "purity": None}
    most = max(s.gmm_k, *s.bic_ks)
    if "gmm" not in skipped and checks["distinct_features"] < most:
        skip("gmm", f"only {checks['distinct_features']} distinct feature vectors: too few for mixtures of "
                    f"up to {most} components")
    if "gmm" not in skipped:
        z = z[:, : s.pca_dim]
        # One BLAS thread: EM's matrices are at most pca_dim wide, too small for threads to pay, and
        # with threads every fit was 10-35x slower on a busy 2-core machine (measured). The BIC
        # scan's fits run side by side in threads instead.
        with threadpool_limits(1, user_api="blas"):
            gmm = clusters.fit_gmm(z, s.gmm_k, "full", s.seed)
            sample = np.random.default_rng(s.seed).permutation(len(z))[: s.bic_points]
            scan = clusters.bic_scan(z[sample], s.bic_ks, s.bic_types, s.seed, n_jobs=threads or available_cpus())
        scores = clusters.cluster_scores(dump.labels, gmm["labels"])
        used = len(np.unique(gmm["labels"]))
        checks["gmm_clusters_used"] = used
        if used == 1:
            reasons.append(f"the Gaussian mixture puts all {len(z)} feature vectors in one cluster")
        a["embedding"].update(gmm=gmm["labels"],
                              contingency=clusters.contingency(dump.labels, gmm["labels"], len(classes)))
        a["bic"] = {"bic": scan["bic"], "ks": scan["ks"], "covariance_types": scan["covariance_types"]}
        gmm_meta = {"k": s.gmm_k, "covariance_type": "full", "k_reason": scored_k_reason(s.gmm_k, len(classes)),
                    "pca_dim": int(z.shape[1]), "converged": gmm["converged"], "n_iter": gmm["n_iter"],
                    "bic": gmm["bic"], "bic_best": list(scan["best"]), "clusters_used": used}
    lap("gmm")

    conf = metrics.confusion(dump.labels, dump.predictions, len(classes))
    pca_ = metrics.per_class_accuracy(dump.labels, dump.predictions, len(classes))
    calib = metrics.ece(dump.logits, dump.labels)
    a["metrics"] = {"confusion": conf, "per_class_accuracy": pca_}
    lap("metrics")

    summary = {"test_acc": float((dump.predictions == dump.labels).mean()), "ece": calib, **scores, **summary}
    m = {
        "schema": SCHEMA, "trial_id": trial_dir.name, "settings": s.to_dict(), "summary": summary,
        "degenerate": {"detected": bool(reasons), "reasons": reasons, "checks": checks}, "skipped": skipped,
        "gmm": gmm_meta, "tsne": tsne_meta,
        "cam": {"method": s.cam_method, "methods": methods, "layer": a["cam"]["layer"]},
        "faithfulness": f_meta, "sanity": sc_meta,
        "per_class_accuracy": dict(zip(classes, pca_)),
        "probes": idx.tolist(), "classes": classes, "images": IMAGES_RULE, "device": str(device), "seconds": secs,
        "cpu_seconds": cpu_secs,
    }
    return a, json_safe(m)


# Which test images each analysis reads (the same rule for every trial; said in metrics.json and the report).
IMAGES_RULE = ("accuracy, calibration, t-SNE and the mixture: the spec's test set (test_size); the probe images, "
               "faithfulness and the randomization check: class-balanced images drawn with a fixed seed from the "
               "whole prepared test split, so that every sweep, whatever its test_size, shows and scores the "
               "same images")


def json_safe(obj: Any) -> Any:
    """``obj`` with numpy values as plain Python ones and every non-finite number as None: JSON has
    no NaN, and a value that was not computed is null, never a fake number."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


def draw_trial(out: Path, a: dict[str, Any], m: dict[str, Any], history: dict[str, np.ndarray]) -> list[Path]:
    """The per-trial figures, from the arrays alone; none for an analysis that was skipped
    (``m["skipped"]`` says why)."""
    from . import viz

    classes, p = a["classes"], a["probes"]
    figs = {
        "curves": lambda: viz.curves(history),
        "filters_first": lambda: viz.filters_rgb(a["filters"]["init"]["first"], a["filters"]["trained"]["first"]),
        "filters_last": lambda: viz.filter_grid(a["filters"]["init"]["last"], a["filters"]["trained"]["last"],
                                                a["fmaps"]["layers"][1]),
        "fmaps_first": lambda: viz.feature_maps(p["images"], a["fmaps"]["init"]["first"],
                                                a["fmaps"]["trained"]["first"], a["fmaps"]["layers"][0], classes,
                                                p["labels"]),
        "fmaps_last": lambda: viz.feature_maps(p["images"], a["fmaps"]["init"]["last"], a["fmaps"]["trained"]["last"],
                                               a["fmaps"]["layers"][1], classes, p["labels"]),
        "through_layers": lambda: viz.through_layers(p["images"][0],
                                                     {n: a["through"][n] for n in a["through"]["layers"]}),
        "confusion": lambda: viz.confusion(a["metrics"]["confusion"], a["metrics"]["per_class_accuracy"], classes,
                                           m["summary"]["ece"], _reliability(out.parent)),
    }
    if "cam" not in m["skipped"]:
        figs["cam"] = lambda: viz.cam_overlays(p["images"], {k: a["cam"][k] for k in a["cam"]["methods"]},
                                               p["labels"], p["predictions"], classes)
    if "faithfulness" in a:
        f = a["faithfulness"]
        figs["faithfulness"] = lambda: viz.faithfulness(f["x"], f["deletion"], f["insertion"], f["deletion_random"],
                                                        f["insertion_random"])
    if "sanity" in a:
        figs["sanity"] = lambda: viz.sanity(a["sanity"]["layers"], a["sanity"]["spearman"], a["sanity"]["maps"],
                                            a["sanity"]["image"])
    e = a["embedding"]
    if "tsne" in e and "gmm" in e:
        figs["tsne_gmm"] = lambda: viz.tsne_gmm(e["tsne"], e["labels"], e["gmm"], classes,
                                                {k: m["summary"][k] for k in ("ari", "nmi", "purity")})
    if "gmm" in e:
        figs["bic"] = lambda: viz.bic(a["bic"]["bic"], a["bic"]["ks"], a["bic"]["covariance_types"],
                                      tuple(m["gmm"]["bic_best"]), scored=(m["gmm"]["k"], m["gmm"]["covariance_type"]),
                                      why=m["gmm"].get("k_reason", ""))
        figs["contingency"] = lambda: viz.contingency(e["contingency"], classes)
    if "bn" in a:
        figs["bn_histograms"] = lambda: viz.bn_histograms({n: a["bn"][n] for n in a["bn"]["layers"]})
    return [viz.save(draw(), out / f"{name}.png") for name, draw in figs.items()]


def scored_k_reason(k: int, n_classes: int) -> str:
    """Why the mixture that is shown and scored has ``k`` components, whatever k the BIC scan prefers."""
    if k == n_classes:
        return (f"one component per class: ARI, NMI and purity compare the clusters with the {n_classes} classes; "
                "the BIC scan's lowest k is shown, not scored")
    return f"k = {k} as set (Settings.gmm_k); the BIC scan's lowest k is shown, not scored"


def _reliability(trial_dir: Path) -> dict[str, np.ndarray] | None:
    """The reliability diagram's bins, from the logits of the trial's test-set dump (None without one)."""
    from . import features, viz

    path = trial_dir / "features.h5"
    if not path.is_file():
        return None
    dump = features.read(path)
    return viz.reliability_bins(dump.logits, dump.labels)


# ---------------------------------------------------------------------------- the sweep

@dataclass
class Summary:
    pivot: dict[str, Any]
    done: list[str] = field(default_factory=list)  # interpreted by this run
    skipped: list[str] = field(default_factory=list)  # up to date already
    failed: dict[str, str] = field(default_factory=dict)  # trial id -> error line
    report: Path | None = None


def _task(trial_dir: str, settings: Settings, threads: int | None, force: bool) -> dict[str, Any]:
    """One trial's interpretation; an error is returned (and kept in interpret/error.txt), not raised."""
    try:
        return interpret_trial(trial_dir, settings, threads, force)
    except Exception as e:  # noqa: BLE001 - one trial's failure must not stop the others
        return _failed(trial_dir, f"{type(e).__name__}: {e}", traceback.format_exc())


def _failed(trial_dir: str, error: str, text: str | None = None) -> dict[str, Any]:
    atomic_write_text(Path(trial_dir) / "interpret" / "error.txt", text or error + "\n")
    return {"trial_id": Path(trial_dir).name, "error": error}


def _lost(args: tuple, reason: str) -> dict[str, Any]:
    """A trial whose interpreting process died (a crash in native code, out of memory)."""
    return _failed(args[0], reason)


def postprocess(sweep_dir: str | Path, settings: Settings = Settings(), workers: int | None = None,
                address: str | None = None, force: bool = False, tables_only: bool = False) -> Summary:
    """Interpret every completed trial (in parallel on Ray when more than one needs it), then write
    the tables, the sweep figures and report.html.

    workers: parallel trials (default: the CPUs this process may use); 1 runs them in this process.
    address: a running Ray cluster to use instead of starting one.
    """
    from .interpret.embedding import available_cpus
    from .progress import progress
    from .runtime import map_tasks

    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "trials").is_dir():
        raise UserError(f"{sweep_dir}: not a sweep folder (no trials/); pass results/<sweep>")
    summary = Summary(pivot={})
    if not tables_only:
        dirs = [d for d in trial_dirs(sweep_dir)[0] if trial_status(d) in TESTED]
        todo = [d for d in dirs if force or not up_to_date(d, settings)]
        summary.skipped = [d.name for d in dirs if d not in todo]
        cpus = available_cpus()
        in_process = workers == 1 and not address  # asked for: no Ray, and no shelter from a crash
        workers = max(1, min(workers or cpus, len(todo)))
        threads = max(1, cpus // workers)
        with progress(total=len(todo), desc="interpret", unit="trial") as bar:
            calls = [(str(d), settings, threads, force) for d in todo]
            for n, r in enumerate(map_tasks(_task, calls, workers=workers, address=address,
                                                 in_process=in_process, lost=_lost), 1):
                bar.update()
                if bar.disable:  # a log (SLURM, CI) gets one line a trial instead of the bar
                    state = f"failed: {r['error']}" if "error" in r else \
                        "up to date" if r["skipped"] else f"interpreted in {r['seconds']:.1f} s"
                    print(f"interpret {r['trial_id']}: {state} ({n}/{len(todo)})", file=sys.stderr, flush=True)
                if "error" in r:
                    summary.failed[r["trial_id"]] = r["error"]
                elif r["skipped"]:
                    summary.skipped.append(r["trial_id"])
                else:
                    summary.done.append(r["trial_id"])
    summary.pivot = write_tables(sweep_dir)
    if not tables_only:
        from .report import write_report

        draw_sweep(sweep_dir, summary.pivot)
        summary.report = write_report(sweep_dir)
    return summary


def draw_sweep(sweep_dir: Path, pivot: dict[str, Any]) -> list[Path]:
    """figures/: accuracy bars with the chance line, valid curves, the CAM grid and the t-SNE grid;
    the trials in variant x schedule order. The grids show every trial: one without maps or an
    embedding (skipped as degenerate, not interpreted, never finished) gets a grey panel saying why."""
    from . import viz
    from .results import collect_rows, ordered

    out = sweep_dir / "figures"
    rows = ordered(collect_rows(sweep_dir))
    variant_of = {r["trial_id"]: r["variant"] for r in rows}
    trials = [sweep_dir / "trials" / r["trial_id"] for r in rows]
    trials = [d for d in trials if (d / "history.csv").is_file()]
    done = [d for d in trials if all((d / "interpret" / f).is_file() for f in ("arrays.h5", "metrics.json"))]
    arrays = {d.name: read_arrays(d / "interpret" / "arrays.h5") for d in done}
    # CIFAR-10 has 10 classes; an interpreted trial names them.
    n_classes = len(arrays[done[0].name]["classes"]) if done else 10
    chance = 1 / n_classes if pivot["metric"] in ("test_acc", "best_valid_acc") else None
    written = [viz.save(viz.accuracy_bars(pivot, chance), out / "accuracy.png")]
    if trials:
        written.append(viz.save(viz.valid_curves({d.name: _history(d) for d in trials}, variant_of),
                                out / "valid_curves.png"))
    if done:
        first = arrays[done[0].name]
        ids = [r["trial_id"] for r in rows]
        groups = [variant_of[t] for t in ids]
        why = grid_panels(sweep_dir, "cam_grid", arrays)
        if any(w is None for w in why.values()):
            method, p = _cam_method(sweep_dir, done[0].name), first["probes"]
            cams = [arrays[t]["cam"][method] if why[t] is None else None for t in ids]
            preds = [arrays[t]["probes"]["predictions"] if why[t] is None else None for t in ids]
            written.append(viz.save(viz.cam_grid(p["images"], cams, ids, first["classes"], p["labels"], targets=preds,
                                                 method=method, groups=groups, why=why), out / "cam_grid.png"))
        why = grid_panels(sweep_dir, "tsne_grid", arrays)
        if any(w is None for w in why.values()):
            emb = [arrays[t]["embedding"] if why[t] is None else None for t in ids]
            written.append(viz.save(viz.tsne_grid([None if e is None else e["tsne"] for e in emb],
                                                  [None if e is None else e["labels"] for e in emb],
                                                  ids, first["classes"], rows=groups, why=why),
                                    out / "tsne_grid.png"))
    return written


def _cam_method(sweep_dir: Path, trial_id: str) -> str:
    """The CAM method a trial's interpretation scored (the sweep's CAM grid shows it)."""
    from .results import read_interpretation

    return (read_interpretation(sweep_dir / "trials" / trial_id) or {}).get("cam", {}).get("method", "gradcam")


def grid_panels(sweep_dir: Path, figure: str, arrays: dict[str, dict] | None = None) -> dict[str, str | None]:
    """Every trial of the sweep, in variant x schedule order, and why a sweep grid ("cam_grid" or
    "tsne_grid") has nothing to show for it: None where it has something, else one line (the analysis
    was skipped, and its reason; the trial was not interpreted; it has no result). ``arrays``: the
    interpreted trials' arrays.h5, where the caller has read them."""
    from .report import FIGURE_ANALYSES
    from .results import collect_rows, interpretation_state, ordered, read_interpretation

    rows = ordered(collect_rows(sweep_dir))
    done = [r["trial_id"] for r in rows if all((sweep_dir / "trials" / r["trial_id"] / "interpret" / f).is_file()
                                               for f in ("arrays.h5", "metrics.json"))]
    if arrays is None:
        arrays = {t: read_arrays(sweep_dir / "trials" / t / "interpret" / "arrays.h5") for t in done}
    method = _cam_method(sweep_dir, done[0]) if done else "gradcam"
    analyses = FIGURE_ANALYSES[figure]
    out: dict[str, str | None] = {}
    for r in rows:
        tid = r["trial_id"]
        if tid not in done:
            why = interpretation_state(sweep_dir / "trials" / tid)[1]
            out[tid] = why or ("not interpreted" if r["status"] in TESTED else f"{r['status']}: no result")
            continue
        skipped = (read_interpretation(sweep_dir / "trials" / tid) or {}).get("skipped", {})
        reasons = [v if k == analyses[0] else f"{k}: {v}" for k, v in skipped.items() if k in analyses or k == figure]
        a = arrays[tid]
        if reasons:
            out[tid] = "; ".join(reasons)
        elif figure == "cam_grid" and method not in a.get("cam", {}):
            out[tid] = f"no {method} maps"
        elif figure == "cam_grid" and not np.array_equal(a["probes"]["indices"], arrays[done[0]]["probes"]["indices"]):
            out[tid] = "other probe images than the other trials'"
        elif figure == "tsne_grid" and "tsne" not in a.get("embedding", {}):
            out[tid] = "no embedding"
        else:
            out[tid] = None
    return out
