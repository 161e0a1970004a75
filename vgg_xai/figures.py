"""The figures of a trial's interpretation and of a sweep, assembled from what post-processing
stored: each trial's interpret/arrays.h5 and metrics.json, its history.csv, and the sweep's table.
`viz` draws each figure; nothing here computes a result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import trial_folder, viz
from .trial_folder import TESTED
from .interpret_arrays import read_arrays
from .results import collect_rows, interpretation_state, ordered, read_interpretation

# The per-epoch columns the curves are drawn from.
CURVES = ("epoch", "train_loss", "valid_loss", "train_acc", "valid_acc")


def read_curves(trial_dir: Path) -> dict[str, np.ndarray]:
    """A trial's history.csv as one array per column of the curves."""
    rows = trial_folder.read_history(trial_dir)
    return {c: np.asarray([r[c] for r in rows], dtype=np.float64) for c in CURVES}


def draw_trial(out: Path, a: dict[str, Any], m: dict[str, Any], history: dict[str, np.ndarray]) -> list[Path]:
    """The per-trial figures, from the arrays alone; none for an analysis that was skipped
    (``m["skipped"]`` says why)."""
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
                                           m["summary"]["ece"], a["metrics"]["reliability"]),
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


def draw_sweep(sweep_dir: Path, pivot: dict[str, Any]) -> list[Path]:
    """figures/: accuracy bars with the chance line, valid curves, the CAM grid and the t-SNE grid;
    the trials in variant x schedule order. The grids show every trial: one without maps or an
    embedding (skipped as degenerate, not interpreted, never finished) gets a grey panel saying why."""
    out = sweep_dir / "figures"
    rows = ordered(collect_rows(sweep_dir))
    variant_of = {r["trial_id"]: r["variant"] for r in rows}
    trials = [sweep_dir / "trials" / r["trial_id"] for r in rows]
    trials = [d for d in trials if (d / trial_folder.HISTORY).is_file()]
    done = [d for d in trials if all((d / "interpret" / f).is_file() for f in ("arrays.h5", "metrics.json"))]
    arrays = {d.name: read_arrays(d / "interpret" / "arrays.h5") for d in done}
    # CIFAR-10 has 10 classes; an interpreted trial names them.
    n_classes = len(arrays[done[0].name]["classes"]) if done else 10
    chance = 1 / n_classes if pivot["metric"] in ("test_acc", "best_valid_acc") else None
    written = [viz.save(viz.accuracy_bars(pivot, chance), out / "accuracy.png")]
    if trials:
        written.append(viz.save(viz.valid_curves({d.name: read_curves(d) for d in trials}, variant_of),
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
    return (read_interpretation(sweep_dir / "trials" / trial_id) or {}).get("cam", {}).get("method", "gradcam")


def grid_panels(sweep_dir: Path, figure: str, arrays: dict[str, dict] | None = None) -> dict[str, str | None]:
    """Every trial of the sweep, in variant x schedule order, and why a sweep grid ("cam_grid" or
    "tsne_grid") has nothing to show for it: None where it has something, else one line (the analysis
    was skipped, and its reason; the trial was not interpreted; it has no result). ``arrays``: the
    interpreted trials' arrays.h5, where the caller has read them."""
    from .report import FIGURE_ANALYSES

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
