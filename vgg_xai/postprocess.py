"""The post-processing job: per trial, the interpretation suite; per sweep, the aggregate tables,
the sweep figures and report.html. Idempotent; runs at the end of every sweep and as SLURM's job
after the sweep job. The analyses are in `analyses`, the figures are assembled in `figures`, and
arrays.h5's format is `interpret_arrays`; this module composes them, writes metrics.json and fans
the trials out on Ray.

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

import numpy as np

from . import interpret_arrays
from .atomic import atomic_write_text
from .errors import UserError
from .interpret_arrays import SCHEMA, write_arrays
from .locks import locked
from .results import trial_status, write_tables
from .trial_folder import TESTED, trial_dirs


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
        arrays_schema = interpret_arrays.schema(trial_dir / "interpret" / "arrays.h5")  # cut short: it does not open
    except (ValueError, OSError):  # a damaged metrics.json or arrays.h5: redo it
        return False
    return isinstance(saved, dict) and saved.get("schema") == SCHEMA == arrays_schema \
        and saved.get("settings") == settings.to_dict()


def interpret_trial(trial_dir: str | Path, settings: Settings = Settings(), threads: int | None = None,
                    force: bool = False) -> dict[str, Any]:
    """Run the interpretation suite on one finished trial; returns ``{"trial_id", "skipped", "seconds"}``.

    Safe to call from several processes at once (one computes, the others wait and skip).
    """
    from . import figures

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
        drawn = figures.draw_trial(out, arrays, metrics, figures.read_curves(trial_dir))
        for old in set(out.glob("*.png")) - set(drawn):  # a figure of an analysis skipped this time
            old.unlink()
        write_arrays(out / "arrays.h5", arrays)
        metrics["seconds"]["total"] = time.perf_counter() - t0
        # Last: marks it complete. compute leaves no NaN in it: a value not computed is None.
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False))
        (out / "error.txt").unlink(missing_ok=True)
        return {"trial_id": trial_dir.name, "skipped": False, "seconds": metrics["seconds"]["total"]}


class _Laps:
    """Wall and CPU seconds per step; CPU time of this process (all its threads) is what a busy machine
    does not inflate."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._last = time.perf_counter(), time.process_time()

    def __call__(self, step: str) -> None:
        now = time.perf_counter(), time.process_time()
        self.wall[step], self.cpu[step] = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now


def compute(trial_dir: Path, s: Settings, threads: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything the suite measures for one trial: (arrays for arrays.h5, metrics for metrics.json).

    Each analysis (`analyses`) checks the degenerate results it meets where it makes them
    (`interpret.degenerate`): what was found goes to ``metrics["degenerate"]`` (``detected``, one line
    per finding in ``reasons``, the measured ``checks``); an analysis they make meaningless is not
    run: its one-line reason goes to ``metrics["skipped"]``, its arrays are left out, its summary
    values and its section of metrics.json are None.
    """
    from . import analyses as an

    lap = _Laps()
    inp = an.load_inputs(trial_dir, s, threads)
    lap("load")
    parts: dict[str, an.Result] = {}
    for step, analysis in (("filters", an.filters_and_maps), ("bn_histograms", an.bn_histograms),
                           ("cam", an.class_maps), ("faithfulness", an.deletion_insertion),
                           ("sanity", an.randomization)):
        parts[step] = analysis(inp)
        lap(step)
    components = an.principal_components(inp)  # one PCA for both
    for step, analysis in (("tsne", an.tsne), ("gmm", an.mixture)):
        parts[step] = analysis(inp, components)
        lap(step)
    parts["metrics"] = an.classification(inp)
    lap("metrics")

    findings = inp.feature_findings + [f for r in parts.values() for f in r.findings]
    checks = an.merge(inp.feature_checks, *(r.checks for r in parts.values()))
    arrays = an.merge({"probes": an.probe_arrays(inp), "classes": inp.classes,
                       "embedding": {"labels": inp.dump.labels}}, *(r.arrays for r in parts.values()))
    metrics = {
        "schema": SCHEMA, "trial_id": trial_dir.name, "settings": s.to_dict(),
        "summary": an.merge(*(parts[step].summary for step in ("metrics", "gmm", "faithfulness", "sanity"))),
        "degenerate": {"detected": bool(findings), "reasons": findings, "checks": checks},
        "skipped": {step: r.skipped for step, r in parts.items() if r.skipped},
        **{step: parts[step].details for step in ("gmm", "tsne", "cam", "faithfulness", "sanity")},
        "per_class_accuracy": parts["metrics"].details, "probes": inp.probes.tolist(), "classes": inp.classes,
        "images": IMAGES_RULE, "device": str(inp.test.device), "seconds": lap.wall, "cpu_seconds": lap.cpu,
    }
    return arrays, json_safe(metrics)


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
        from .figures import draw_sweep
        from .report import write_report

        draw_sweep(sweep_dir, summary.pivot)
        summary.report = write_report(sweep_dir)
    return summary
