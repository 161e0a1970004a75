"""The post-processing job: per trial, the interpretation suite; per sweep, the aggregate tables,
the sweep figures and report.html. Idempotent; runs at the end of every sweep and as SLURM's job
after the sweep job.

Per trial it writes ``trials/<id>/interpret/``: figures (PNG), ``arrays.h5`` (everything the
figures are drawn from) and, last, ``metrics.json``, which marks the folder complete. A trial is
skipped while its metrics.json is newer than its checkpoint and features and was made with the
same settings. A lock file per trial makes two post-processing runs at once safe: the second
waits, then finds the trial up to date. Every file is written atomically.
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

from .checkpoint import atomic_write_bytes, atomic_write_text
from .errors import UserError
from .locks import locked
from .results import trial_status, write_tables

SCHEMA = "vgg-xai/interpret/1"


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
    perplexity: float = 30.0
    tsne_method: str = "auto"  # openTSNE's: FFT from 10,000 points, Barnes-Hut below
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
    """metrics.json exists, is newer than the checkpoint and features, and used these settings."""
    metrics = trial_dir / "interpret" / "metrics.json"
    if not metrics.is_file():
        return False
    inputs = [trial_dir / "checkpoint.pt", trial_dir / "features.h5"]
    if any(p.is_file() and p.stat().st_mtime_ns > metrics.stat().st_mtime_ns for p in inputs):
        return False
    try:
        return json.loads(metrics.read_text()).get("settings") == settings.to_dict()
    except ValueError:
        return False


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
        arrays, metrics = compute(trial_dir, settings, threads)
        out = trial_dir / "interpret"
        draw_trial(out, arrays, metrics, _history(trial_dir))
        write_arrays(out / "arrays.h5", arrays)
        metrics["seconds"]["total"] = time.perf_counter() - t0
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))  # last: marks it complete
        (out / "error.txt").unlink(missing_ok=True)
        return {"trial_id": trial_dir.name, "skipped": False, "seconds": metrics["seconds"]["total"]}


def _history(trial_dir: Path) -> dict[str, np.ndarray]:
    import csv

    rows = list(csv.DictReader((trial_dir / "history.csv").open()))
    cols = ("epoch", "train_loss", "valid_loss", "train_acc", "valid_acc")
    return {c: np.asarray([float(r[c]) if r[c] not in ("", "nan") else np.nan for r in rows]) for c in cols}


def compute(trial_dir: Path, s: Settings, threads: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything the suite measures for one trial: (arrays for arrays.h5, metrics for metrics.json)."""
    import torch
    from threadpoolctl import threadpool_limits

    from . import checkpoint, features
    from .config import TrialConfig
    from .data import DeviceSplit, load_cache
    from .interpret import activations, cam, clusters, embedding, faithfulness, filters, metrics, probes, sanity
    from .model import build_model
    from .train import resolve_device

    secs: dict[str, float] = {}
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        secs[name] = now - tick
        tick = now

    cfg = TrialConfig.from_dict(json.loads((trial_dir / "config.json").read_text()))
    device = resolve_device(cfg.device)
    prep = load_cache(cfg.data)
    test_x, test_y = prep.splits["test"]
    test = DeviceSplit(test_x, test_y, prep.mean, prep.std, device)
    classes = prep.classes

    def load(name: str) -> torch.nn.Module:
        net = build_model(cfg)
        net.load_state_dict(checkpoint.load(trial_dir / name)["model"])
        return net.to(device).eval()

    def normalized(idx: np.ndarray | slice) -> torch.Tensor:
        return test.normalize(test.images[idx].float().div_(255))

    trained, init = load("checkpoint.pt"), load("checkpoint_init.pt")
    idx = probes.probe_indices(test_y, seed=s.probe_seed, per_class=s.probes_per_class)
    x = normalized(torch.from_numpy(idx))
    with torch.no_grad():
        preds = trained(x).argmax(1).cpu().numpy()
    a: dict[str, Any] = {"probes": {"indices": idx, "images": test_x[idx].transpose(0, 2, 3, 1),
                                    "labels": test_y[idx], "predictions": preds}, "classes": classes}
    lap("load")

    # Filters and feature maps: the first and the last conv layer, untrained beside trained.
    c = s.channels
    first, last = trained.conv_layers()[0][0], trained.last_conv()[0]
    a["filters"], a["fmaps"] = {}, {}
    for tag, net in (("init", init), ("trained", trained)):
        a["filters"][tag] = {"first_rgb": filters.first_layer_rgb(filters.conv_weights(net, first)),
                             "last": filters.conv_weights(net, last)[:c, :c]}
        a["fmaps"][tag] = {"first": filters.feature_maps(net, first, x)[:, :c],
                           "last": filters.feature_maps(net, last, x)[:, :c]}
    a["fmaps"]["layers"] = [first, last]
    through = filters.through_every_conv(trained, x[0])
    a["through"] = {"layers": list(through), **{n: m[:c] for n, m in through.items()}}
    lap("filters")

    hist = activations.bn_histograms(trained, normalized(slice(0, s.bn_batch)))
    if hist:
        a["bn"] = {"layers": list(hist), **hist}
    lap("bn_histograms")

    methods = list(s.cam_methods) + (["cam"] if len(trained.head) == 0 else [])
    a["cam"] = {"methods": methods, "layer": cam.default_layer(trained),
                **{m: cam.cam(trained, x, m, targets=preds) for m in methods}}
    lap("cam")

    main = a["cam"][s.cam_method]
    rnd = np.random.default_rng(s.seed).random(main.shape)
    f: dict[str, Any] = {}
    for mode in ("deletion", "insertion"):
        share, probs = faithfulness.perturbation_curves(trained, x, main, preds, mode, s.faithfulness_steps,
                                                        seed=s.seed)
        _, probs_rnd = faithfulness.perturbation_curves(trained, x, rnd, preds, mode, s.faithfulness_steps,
                                                        seed=s.seed)
        f.update({"x": share, mode: probs, f"{mode}_random": probs_rnd})
    a["faithfulness"] = f
    lap("faithfulness")

    sc = sanity.cascading_randomization(trained, x, s.cam_method, seed=s.seed, targets=preds)
    a["sanity"] = {"layers": sc["layers"], "spearman": sc["spearman"], "maps": sc["maps"][:, 0]}
    lap("sanity")

    dump = features.read(trial_dir / "features.h5")
    # One PCA serves both: t-SNE starts from the first 50 components, the GMM from the first pca_dim.
    z = embedding.pca(dump.features, max(50, s.pca_dim), s.seed)
    emb = embedding.tsne(z[:, :50], seed=s.seed, perplexity=s.perplexity, n_jobs=threads, method=s.tsne_method)
    lap("tsne")
    z = z[:, : s.pca_dim]
    # One BLAS thread: EM's matrices are at most pca_dim wide, too small for threads to pay, and
    # with threads every fit was 10-35x slower on a busy 2-core machine (measured).
    with threadpool_limits(1, user_api="blas"):
        gmm = clusters.fit_gmm(z, s.gmm_k, "full", s.seed)
        sample = np.random.default_rng(s.seed).permutation(len(z))[: s.bic_points]
        scan = clusters.bic_scan(z[sample], s.bic_ks, s.bic_types, s.seed)
    scores = clusters.cluster_scores(dump.labels, gmm["labels"])
    a["embedding"] = {"tsne": emb, "labels": dump.labels, "gmm": gmm["labels"],
                      "contingency": clusters.contingency(dump.labels, gmm["labels"], len(classes))}
    a["bic"] = {"bic": scan["bic"], "ks": scan["ks"], "covariance_types": scan["covariance_types"]}
    lap("gmm")

    conf = metrics.confusion(dump.labels, dump.predictions, len(classes))
    pca_ = metrics.per_class_accuracy(dump.labels, dump.predictions, len(classes))
    calib = metrics.ece(dump.logits, dump.labels)
    a["metrics"] = {"confusion": conf, "per_class_accuracy": pca_}
    lap("metrics")

    auc = lambda p: float(faithfulness.curve_auc(p).mean())  # noqa: E731
    summary = {
        "test_acc": float((dump.predictions == dump.labels).mean()), "ece": calib, **scores,
        "deletion_auc": auc(f["deletion"]), "insertion_auc": auc(f["insertion"]),
        "deletion_auc_random": auc(f["deletion_random"]), "insertion_auc_random": auc(f["insertion_random"]),
        "sanity_rho": float(sc["spearman"][-1]),
    }
    m = {
        "schema": SCHEMA, "trial_id": trial_dir.name, "settings": s.to_dict(), "summary": summary,
        "gmm": {"k": s.gmm_k, "covariance_type": "full", "pca_dim": int(z.shape[1]), "converged": gmm["converged"],
                "n_iter": gmm["n_iter"], "bic": gmm["bic"], "bic_best": list(scan["best"])},
        "cam": {"method": s.cam_method, "methods": methods, "layer": a["cam"]["layer"]},
        "sanity": {"layers": sc["layers"], "spearman": sc["spearman"].tolist()},
        "per_class_accuracy": dict(zip(classes, [None if np.isnan(v) else float(v) for v in pca_])),
        "probes": idx.tolist(), "classes": classes, "device": str(device), "seconds": secs,
    }
    return a, m


def draw_trial(out: Path, a: dict[str, Any], m: dict[str, Any], history: dict[str, np.ndarray]) -> list[Path]:
    """The per-trial figures, from the arrays alone."""
    from . import viz

    classes, p = a["classes"], a["probes"]
    figs = {
        "curves": viz.curves(history),
        "filters_first": viz.filters_rgb(a["filters"]["init"]["first_rgb"], a["filters"]["trained"]["first_rgb"]),
        "filters_last": viz.filter_grid(a["filters"]["init"]["last"], a["filters"]["trained"]["last"],
                                        a["fmaps"]["layers"][1]),
        "fmaps_first": viz.feature_maps(p["images"], a["fmaps"]["init"]["first"], a["fmaps"]["trained"]["first"],
                                        a["fmaps"]["layers"][0], classes, p["labels"]),
        "fmaps_last": viz.feature_maps(p["images"], a["fmaps"]["init"]["last"], a["fmaps"]["trained"]["last"],
                                       a["fmaps"]["layers"][1], classes, p["labels"]),
        "through_layers": viz.through_layers(p["images"][0], {n: a["through"][n] for n in a["through"]["layers"]}),
        "cam": viz.cam_overlays(p["images"], {k: a["cam"][k] for k in a["cam"]["methods"]}, p["labels"],
                                p["predictions"], classes),
        "faithfulness": viz.faithfulness(a["faithfulness"]["x"], a["faithfulness"]["deletion"],
                                         a["faithfulness"]["insertion"], a["faithfulness"]["deletion_random"],
                                         a["faithfulness"]["insertion_random"]),
        "sanity": viz.sanity(a["sanity"]["layers"], a["sanity"]["spearman"], a["sanity"]["maps"], p["images"][0]),
        "tsne_gmm": viz.tsne_gmm(a["embedding"]["tsne"], a["embedding"]["labels"], a["embedding"]["gmm"], classes,
                                 {k: m["summary"][k] for k in ("ari", "nmi", "purity")}),
        "bic": viz.bic(a["bic"]["bic"], a["bic"]["ks"], a["bic"]["covariance_types"], tuple(m["gmm"]["bic_best"])),
        "contingency": viz.contingency(a["embedding"]["contingency"], classes),
        "confusion": viz.confusion(a["metrics"]["confusion"], a["metrics"]["per_class_accuracy"], classes,
                                   m["summary"]["ece"]),
    }
    if "bn" in a:
        figs["bn_histograms"] = viz.bn_histograms({n: a["bn"][n] for n in a["bn"]["layers"]})
    return [viz.save(fig, out / f"{name}.png") for name, fig in figs.items()]


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
        dirs = sorted(d for d in (sweep_dir / "trials").iterdir() if trial_status(d) == "completed")
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
    """figures/: accuracy bars, valid curves, the CAM grid and the t-SNE grid."""
    from . import viz

    out = sweep_dir / "figures"
    written = [viz.save(viz.accuracy_bars(pivot), out / "accuracy.png")]
    trials = sorted(d for d in (sweep_dir / "trials").iterdir() if (d / "history.csv").is_file())
    if trials:
        variant_of = {d.name: json.loads((d / "config.json").read_text())["variant"] for d in trials}
        written.append(viz.save(viz.valid_curves({d.name: _history(d) for d in trials}, variant_of),
                                out / "valid_curves.png"))
    done = [d for d in trials if (d / "interpret" / "arrays.h5").is_file()]
    if done:
        arrays = {d.name: read_arrays(d / "interpret" / "arrays.h5") for d in done}
        first = arrays[done[0].name]
        same_probes = [t for t, a in arrays.items() if np.array_equal(a["probes"]["indices"],
                                                                      first["probes"]["indices"])]
        method = json.loads((done[0] / "interpret" / "metrics.json").read_text())["cam"]["method"]
        written.append(viz.save(viz.cam_grid(first["probes"]["images"],
                                             np.stack([arrays[t]["cam"][method] for t in same_probes]),
                                             same_probes, first["classes"], first["probes"]["labels"]),
                                out / "cam_grid.png"))
        written.append(viz.save(viz.tsne_grid([a["embedding"]["tsne"] for a in arrays.values()],
                                              [a["embedding"]["labels"] for a in arrays.values()],
                                              list(arrays), first["classes"]), out / "tsne_grid.png"))
    return written
