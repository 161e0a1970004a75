"""Read a sweep's trial folders, aggregate them, and write, print and pull the results tables.

A row per trial comes from its small files (config.json, result.json, history.csv and, once
post-processing has run, interpret/metrics.json), so a copy made by `pull` reads the same as
the sweep folder on the cluster.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import SCHEDULES, VARIANTS
from .errors import UserError, format_size
from . import trial_folder
from .trial_folder import TESTED
from .stats import ALPHA, mean_interval

# The summary values of faithfulness and of the randomization check in a trial's interpret/metrics.json
# (post-processing writes them, None where not computed): each AUC beside its random-map baseline with
# their standard errors; the map against the random map on the same image (the mean paired difference,
# its standard error and paired-t p, the share of images the map wins); the image count; the randomization
# check's two statistics (rectified maps; ABS, the absolute values of the unrectified maps) with their
# spread and noise floors, and what they count.
FAITHFULNESS_KEYS = [f"{mode}{part}" for mode in ("deletion", "insertion")
                     for part in ("_auc", "_auc_se", "_auc_random", "_auc_random_se", "_vs_random", "_vs_random_se",
                                  "_wins", "_vs_random_p")] + ["faithfulness_n_images"]
SANITY_KEYS = ["sanity_rho", "sanity_rho_std", "sanity_floor", "sanity_floor_std", "sanity_abs_rank_rho",
               "sanity_abs_rank_rho_std", "sanity_abs_floor", "sanity_abs_floor_std", "sanity_n_draws",
               "sanity_n_images", "sanity_n_pairs", "sanity_n_degenerate"]
# The one list of a trial's interpret/metrics.json ["summary"] values, per analysis (the one that
# computes them; each None where it was skipped), in the order of the table columns; test_acc is read
# from result.json.
SUMMARY_KEYS = {"gmm": ["ari", "nmi", "purity"], "calibration": ["ece"], "faithfulness": FAITHFULNESS_KEYS,
                "sanity": SANITY_KEYS}
INTERPRET_COLUMNS = [k for keys in SUMMARY_KEYS.values() for k in keys]
# The ones pivoted and ranked (the rest are read with them: errors, spreads, counts).
INTERPRET_METRICS = ["ari", "nmi", "purity", "ece", "deletion_auc", "deletion_auc_random", "deletion_vs_random",
                     "deletion_wins", "insertion_auc", "insertion_auc_random", "insertion_vs_random", "insertion_wins",
                     "sanity_rho", "sanity_floor", "sanity_abs_rank_rho", "sanity_abs_floor"]
# Each faithfulness score's verdict against the random map, from its paired difference (verdict()).
VERDICT_COLUMNS = ["deletion_verdict", "insertion_verdict"]
BEATS, DOES_NOT = "beats the random map", "does not"
# interpretation: done, failed (interpret/error.txt says why) or empty (not run yet).
ROW_COLUMNS = ["trial_id", "variant", "lr_schedule", "seed", "status", "degenerate", "interpretation", "note",
               "epochs", "best_valid_acc", "best_epoch", "test_acc", *INTERPRET_COLUMNS, *VERDICT_COLUMNS, "wall_s"]
# The columns `pivot` aggregates over seeds.
METRICS = ["test_acc", "best_valid_acc", "best_epoch", "epochs", *INTERPRET_METRICS, "wall_s"]
NUMERIC_COLUMNS = [*METRICS, *(c for c in INTERPRET_COLUMNS if c not in METRICS)]
FORMATS = ("table", "md", "csv", "json", "latex")
# The metrics where lower is better (calibration error, deletion AUC, the CAM's correlation with a
# randomized model's, time): `results --sort` ranks these ascending, every other one descending. A
# random-map baseline goes the way of its score. sanity_rho is better near 0, so it is ranked by its
# size (a strongly negative correlation is no better than a strongly positive one).
LOWER_IS_BETTER = ("ece", "deletion_auc", "deletion_auc_random", "deletion_vs_random", "sanity_rho", "sanity_floor",
                   "sanity_abs_rank_rho", "sanity_abs_floor", "wall_s")
BY_SIZE = ("sanity_rho",)
# The columns of `results --sort`; the metric ranked by comes after status and the degenerate flag.
RANK_COLUMNS = ["trial_id", "variant", "lr_schedule", "seed", "status", "degenerate", "test_acc", "best_valid_acc",
                "epochs", "wall_s"]
# Counts, printed as whole numbers (a mean over seeds with one decimal); seconds get one decimal, the
# rest (accuracies, scores) four. CSV and JSON keep every digit.
WHOLE_COLUMNS = ("seed", "epochs", "best_epoch", "faithfulness_n_images", "sanity_n_draws", "sanity_n_images",
                 "sanity_n_pairs", "sanity_n_degenerate")
# The mark of a pivot cell that averages in a degenerate trial, explained under the table.
DAGGER = "†"


def trial_status(trial_dir: Path) -> str:
    """completed | diverged (from result.json), failed (error.txt), running/pending otherwise; damaged
    where result.json does not read (trial_folder.Damaged)."""
    try:
        return trial_folder.state(trial_dir)
    except trial_folder.Damaged:
        return "damaged"


def _last_line(error_file: Path) -> str:
    """The last non-blank line of an error file (a traceback's exception line); "failed" if none."""
    lines = [x for x in error_file.read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1].strip() if lines else "failed"


def trial_note(trial_dir: Path, status: str) -> str:
    """Why a trial has no result: the last line of its error (failed), or that it never started."""
    if status == "failed":
        return _last_line(trial_dir / "error.txt")
    return "not started" if status == "pending" else ""


def interpretation_state(trial_dir: Path) -> tuple[str, str]:
    """(done | failed | "" where post-processing has not run on it, why it failed): a metrics.json is
    a finished interpretation; an interpret/error.txt without one, a failed one."""
    out = trial_dir / "interpret"
    if (out / "metrics.json").is_file():
        return "done", ""
    if (out / "error.txt").is_file():
        return "failed", f"interpretation failed: {_last_line(out / 'error.txt')}"
    return "", ""


def read_interpretation(trial_dir: Path) -> dict[str, Any] | None:
    """A trial's interpret/metrics.json, None where post-processing has not written one.

    The parts the tables and the report read are made safe to read: ``summary`` a dict, ``degenerate``
    {"detected": True, False or None (not checked: an older file), "reasons": [lines]} and ``skipped``
    {analysis: reason}; missing or malformed ones read as empty.
    """
    path = trial_dir / "interpret" / "metrics.json"
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise trial_folder.Damaged(path, f"not valid JSON ({e})") from None
    if not isinstance(m, dict):
        raise trial_folder.Damaged(path, "not a metrics file (a JSON object)")
    deg = m.get("degenerate") if isinstance(m.get("degenerate"), dict) else {}
    reasons, skipped = deg.get("reasons"), m.get("skipped")
    return {**m, "summary": m["summary"] if isinstance(m.get("summary"), dict) else {},
            "degenerate": {**deg, "detected": deg["detected"] if isinstance(deg.get("detected"), bool) else None,
                           "reasons": [str(r) for r in reasons] if isinstance(reasons, list) else []},
            "skipped": {str(k): str(v) for k, v in skipped.items()} if isinstance(skipped, dict) else {}}


def _interpret_columns(trial_dir: Path) -> dict[str, Any]:
    """A trial's INTERPRET_COLUMNS (NaN for each one its metrics.json lacks or holds as null) and its
    degenerate flag (None where it was not checked)."""
    out: dict[str, Any] = dict.fromkeys(INTERPRET_COLUMNS, math.nan)
    m = read_interpretation(trial_dir)
    if m is None:
        return {"degenerate": None, **out}
    for k in INTERPRET_COLUMNS:
        v = m["summary"].get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return {"degenerate": m["degenerate"]["detected"], "reasons": m["degenerate"]["reasons"], **out}


def verdict(row: dict[str, Any], mode: str) -> str:
    """Whether a trial's ``mode`` ("deletion" or "insertion") map beats the random map on the same images:
    its paired difference goes the better way (lower for deletion, higher for insertion) with a paired
    t-test p below ALPHA (as stats.paired's ``beats``); "" where it was not computed."""
    diff, p = _number(row.get(f"{mode}_vs_random")), _number(row.get(f"{mode}_vs_random_p"))
    if diff is None or p is None:
        return ""
    better = diff < 0 if mode == "deletion" else diff > 0
    return BEATS if better and p < ALPHA else DOES_NOT


def _from_float32(x: float) -> float:
    """An exact float32 value (an accuracy computed in float32, 0.21299999952316284) as the shortest
    decimal that reads back to it (0.213); any other value as it is."""
    if not math.isfinite(x) or float(np.float32(x)) != x:
        return x
    return float(str(np.float32(x)))


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _from_float32(v) if isinstance(v, float) else v for k, v in row.items()}


def collect_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per trial folder of the sweep's spec (sorted by trial id; folders of trials a grown spec no
    longer lists are left out, see trial_folder.trial_dirs); a trial whose files do not read is a `damaged` row
    whose note names the file, what is wrong and what to do (trial_folder.Damaged), and the others are
    read as ever."""
    return [_clean(_row(d)) for d in trial_folder.trial_dirs(Path(sweep_dir))[0]]


def _row(d: Path) -> dict[str, Any]:
    blank: dict[str, Any] = {"trial_id": d.name, "variant": None, "lr_schedule": None, "seed": None,
                             "status": "pending", "degenerate": None, "interpretation": "", "note": "", "epochs": 0,
                             "best_valid_acc": math.nan, "best_epoch": 0, "test_acc": math.nan,
                             **dict.fromkeys(INTERPRET_COLUMNS, math.nan), **dict.fromkeys(VERDICT_COLUMNS, ""),
                             "wall_s": math.nan}
    try:
        cfg = trial_folder.read_config(d)
        if cfg is None:
            raise trial_folder.Damaged(d / trial_folder.CONFIG, "missing (an empty or half-copied trial folder)")
        blank.update(variant=cfg.get("variant"), lr_schedule=cfg.get("lr_schedule"), seed=cfg.get("seed"))
        result = trial_folder.read_result(d)
        status = result["status"] if result is not None else trial_folder.state(d)  # read result.json once
        done = [h for h in trial_folder.read_history(d) if h["status"] == "ok"]  # a running trial: its epochs so far
    except trial_folder.Damaged as e:
        return {**blank, "status": "damaged", "note": str(e)}
    interpretation, failure = interpretation_state(d)
    try:
        interp = _interpret_columns(d)
    except trial_folder.Damaged as e:  # the training's numbers still count; the interpretation is redone
        interp = {"degenerate": None, **dict.fromkeys(INTERPRET_COLUMNS, math.nan)}
        interpretation, failure = "damaged", str(e)
    reasons = interp.pop("reasons", [])
    why = "degenerate" + (": " + "; ".join(reasons) if reasons else "") if interp["degenerate"] else ""
    row = {**blank, "status": status, "degenerate": interp.pop("degenerate"), "interpretation": interpretation,
           "note": trial_note(d, status) or why or failure, **interp,
           **{f"{m}_verdict": verdict(interp, m) for m in ("deletion", "insertion")}}
    valid = [h["valid_acc"] for h in done]
    row["epochs"] = len(done)
    if valid:
        row.update(best_valid_acc=max(valid), best_epoch=valid.index(max(valid)) + 1)
    if result is not None:
        num = lambda k: math.nan if result.get(k) is None else result[k]  # noqa: E731 - null: undefined (diverged)
        row.update(epochs=result["epochs_completed"], best_valid_acc=num("best_valid_acc"),
                   best_epoch=result["best_epoch"], test_acc=num("test_acc"), wall_s=num("wall_s"))
        if status == "collapsed":  # degenerate by its training alone, whatever the interpretation says
            stopped = f"collapsed: stopped after epoch {result['epochs_completed']}, "
            row.update(degenerate=True, note=stopped + (result.get("collapsed") or "cannot learn again")
                       + (f"; {why}" if why else ""))
    return row


def load_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a sweep folder: from its trial folders, else from its tables/accuracy.json."""
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / "trials").is_dir():
        return collect_rows(sweep_dir)
    table = sweep_dir / "tables" / "accuracy.json"
    if table.is_file():
        try:
            saved = json.loads(table.read_text())["rows"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{table}: not a vgg-xai results table ({e}); run `vgg-xai postprocess` again") from None
        return [_clean({c: math.nan if r.get(c) is None and c in NUMERIC_COLUMNS else r.get(c) for c in ROW_COLUMNS})
                for r in saved]
    held = sorted(d.name for d in sweep_dir.iterdir() if (d / "trials").is_dir() or (d / "tables").is_dir()) \
        if sweep_dir.is_dir() else []
    if held:  # the results root: name its sweeps
        shown = ", ".join(held[:8]) + (f" and {len(held) - 8} more" if len(held) > 8 else "")
        raise UserError(f"{sweep_dir}: a folder of sweeps, not a sweep: {shown}; pass one, e.g. "
                        f"`vgg-xai results {sweep_dir / held[0]}`")
    raise UserError(f"{sweep_dir}: not a sweep folder (no trials/ or tables/accuracy.json); pass results/<sweep>, "
                    f"or copy one from a cluster with `vgg-xai results pull HOST:PATH {sweep_dir}`")


# The settings in which trials pooled from several sweeps may differ: those that name their cell and seed,
# and the data cache's path (the same images may be prepared in another place).
POOL_FREE = ("variant", "bn", "dropout", "l2", "augment", "lr_schedule", "seed", "data")


def pool_rows(sweep_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """The rows of one sweep folder, or of several pooled: the same trial (id and settings) in two of
    them counts once; trials whose settings differ beyond POOL_FREE (another width, more epochs) are
    refused in one line, since their values are not draws of the same cells."""
    if len(sweep_dirs) == 1:
        return load_rows(sweep_dirs[0])
    rows: dict[str, dict[str, Any]] = {}
    settings: dict[str, tuple[Path, dict[str, Any]]] = {}
    first: tuple[Path, dict[str, Any]] | None = None
    for d in map(Path, sweep_dirs):
        for r in load_rows(d):
            cfg_file = d / "trials" / r["trial_id"] / trial_folder.CONFIG
            try:
                cfg = trial_folder.read_config(cfg_file.parent)
            except trial_folder.Damaged:  # its row says so; it has no settings to compare
                cfg = None
            if cfg is not None:
                shared = {k: v for k, v in cfg.items() if k not in POOL_FREE}
                first = first or (cfg_file, shared)
                diff = sorted(k for k in set(shared) | set(first[1]) if shared.get(k) != first[1].get(k))
                if diff:
                    k = diff[0]
                    raise UserError(f"{cfg_file} and {first[0]} differ in {k} ({shared.get(k)!r} against "
                                    f"{first[1].get(k)!r}); pool only sweeps of the same study (other settings: "
                                    "compare them as separate sweeps)")
            if r["trial_id"] in rows and settings.get(r["trial_id"], (None, None))[1] != cfg:
                raise UserError(f"{r['trial_id']} is in {settings[r['trial_id']][0]} and in {d} with other settings; "
                                "pool only sweeps of the same study")
            if r["trial_id"] not in rows:
                rows[r["trial_id"]], settings[r["trial_id"]] = r, (d, cfg)
    return [rows[t] for t in sorted(rows)]


def _known_first(known: list[str]) -> Callable[[str], tuple[int, str]]:
    """Sorts names in the order of ``known`` (the study's), any others after them by name."""
    return lambda x: (known.index(x) if x in known else len(known), x)


def ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows variant x schedule x seed, in the study's order of variants and schedules (the pivot's)."""
    v, s = _known_first(list(VARIANTS)), _known_first(list(SCHEDULES))
    return sorted(rows, key=lambda r: (v(r["variant"] or ""), s(r["lr_schedule"] or ""), r.get("seed") or 0,
                                       r["trial_id"]))


def pivot(rows: list[dict[str, Any]], metric: str = "test_acc") -> dict[str, Any]:
    """variant x schedule -> mean, std (ddof=1 over seeds; 0 for one seed), the 95% t-interval of the
    mean (ci_low, ci_high; None for one seed) and n of a metric, and the values themselves.

    Only completed trials count; n is how many had a value, of how many trials the cell holds. A cell's
    ``degenerate`` lists the degenerate trials among the n, and the pivot's ``degenerate`` says why
    each of them is (trial id -> reasons). For an interpretation metric, a cell's ``failed`` lists its
    trials whose interpretation failed, and the pivot's ``failed`` says why (trial id -> error line).
    """
    if metric not in METRICS:
        raise UserError(f"metric: {metric!r} is not one of {', '.join(METRICS)}")
    unread = {r["trial_id"]: r["note"] for r in rows if r["variant"] is None}  # damaged: no cell to put it in
    rows = [r for r in rows if r["variant"] is not None]
    variants = sorted({r["variant"] for r in rows}, key=_known_first(list(VARIANTS)))
    schedules = sorted({r["lr_schedule"] for r in rows}, key=_known_first(list(SCHEDULES)))
    cells: dict[str, dict[str, Any]] = {}
    why: dict[str, str] = {}
    failures: dict[str, str] = {}
    for v in variants:
        for s in schedules:
            group = [r for r in rows if r["variant"] == v and r["lr_schedule"] == s]
            counted = [r for r in group if r["status"] in TESTED and _number(r.get(metric)) is not None]
            vals = [_number(r[metric]) for r in counted]
            degenerate = [r["trial_id"] for r in counted if r.get("degenerate") is True]
            # a degenerate trial whose analysis was skipped (no ARI for collapsed features) is why the cell is empty
            unvalued = [r["trial_id"] for r in group if r["status"] in TESTED and r.get("degenerate") is True
                        and not counted]
            why.update({r["trial_id"]: _reasons(r) for r in group if r["trial_id"] in degenerate + unvalued})
            failed = [r["trial_id"] for r in group
                      if metric in INTERPRET_METRICS and r.get("interpretation") == "failed"]
            failures.update({r["trial_id"]: str(r.get("note") or "interpretation failed") for r in group
                             if r["trial_id"] in failed})
            low, high = mean_interval(vals)
            cells[f"{v}|{s}"] = {
                "mean": float(np.mean(vals)) if vals else None,
                "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else (0.0 if vals else None),
                "ci_low": _number(low), "ci_high": _number(high),
                "n": len(vals), "of": len(group), "statuses": sorted({r["status"] for r in group}),
                "values": vals, "seeds": [r.get("seed") for r in counted], "degenerate": degenerate,
                "degenerate_no_value": unvalued, "failed": failed,
                # collapsed and learning seeds side by side: two clusters, not one Gaussian spread
                "mixed": bool(degenerate) and any(r.get("degenerate") is False for r in counted),
            }
    damaged = {**unread, **{r["trial_id"]: r["note"] for r in rows if r["status"] == "damaged"}}
    return {"metric": metric, "variants": variants, "schedules": schedules, "cells": cells, "degenerate": why,
            "failed": failures, "damaged": damaged}


def _number(v: Any) -> float | None:
    """A finite number as a float; None for anything else (null, NaN, text, a bool)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _reasons(row: dict[str, Any]) -> str:
    """Why a degenerate row is: its note without the word (collect_rows wrote it as 'degenerate: ...')."""
    note = str(row.get("note") or "")
    return note.removeprefix("degenerate").removeprefix(": ") or "no reason recorded"


def better_key(metric: str) -> Callable[[float], float]:
    """Sorts values of ``metric`` best first (LOWER_IS_BETTER ascending, BY_SIZE by size, others descending)."""
    if metric in BY_SIZE:
        return abs
    return (lambda x: x) if metric in LOWER_IS_BETTER else (lambda x: -x)


def best_cells(p: dict[str, Any]) -> list[str]:
    """The keys ("variant|schedule") of the pivot's best cell by mean, all of them on a tie; [] where no
    cell has a value. A cell with a degenerate trial is not a candidate (a collapsed model is perfectly
    calibrated and its all-zero maps correlate with nothing) while any other cell has a value."""
    key = better_key(p["metric"])
    means = {k: c["mean"] for k, c in p["cells"].items() if c["mean"] is not None}
    sound = {k: m for k, m in means.items() if not p["cells"][k].get("degenerate")}
    means = sound or means
    if not means:
        return []
    best = min(key(m) for m in means.values())
    return [k for k, m in means.items() if key(m) == best]


def cell_text(c: dict[str, Any], pm: str = " ± ", missing: str | None = None, metric: str | None = None,
              mark: str = f" {DAGGER}") -> str:
    """One pivot cell of ``metric`` as text: mean, ``pm`` std and [the 95% t-interval of the mean] when
    there are several seeds, n=seeds (n=n/of when some trials have no value), ``mark`` when a degenerate
    trial is among them; ``missing`` (default: the
    trials' statuses, "interpretation failed" where that is why, n/a where they all completed) when
    none has a value."""
    if c["of"] == 0:
        return ""
    if c["mean"] is None:
        tag = mark if c.get("degenerate_no_value") else ""
        if missing is not None:
            return missing + tag
        if c.get("failed") and c["statuses"] == ["completed"]:
            return "interpretation failed"
        return ("n/a" if c["statuses"] == ["completed"] else "/".join(c["statuses"])) + tag
    text = fmt_value(c["mean"], metric)
    if c["n"] > 1:
        text += f"{pm}{fmt_value(c['std'], metric)}"
        if c.get("ci_low") is not None:
            text += f" [{fmt_value(c['ci_low'], metric)}, {fmt_value(c['ci_high'], metric)}]"
    text += f" n={c['n']}" + (f"/{c['of']}" if c["n"] < c["of"] else "")
    return text + (mark if c.get("degenerate") else "")


def pivot_notes(p: dict[str, Any]) -> list[str]:
    """The lines under a pivot that explain its degenerate mark, one per degenerate trial in it: its
    first finding (the trial's note and the report hold them all; a line must fit a terminal); then
    one per trial whose interpretation failed, so a missing value is not read as never computed."""
    out = []
    for t, r in (p.get("degenerate") or {}).items():
        first, *more = r.split("; ")
        more_text = f"; +{len(more)} more reason{'s' * (len(more) > 1)}" if more else ""
        out.append(f"{DAGGER} includes a degenerate trial: {t} ({first}{more_text})")
    for t, r in (p.get("failed") or {}).items():
        out.append(f"no value for {t}: {r} (trials/{t}/interpret/error.txt; `vgg-xai postprocess` retries it)")
    for t, r in (p.get("damaged") or {}).items():
        out.append(f"not read: {t}: {r}")
    return out


def pivot_title(metric: str) -> str:
    return (f"{metric}: mean ± std over seeds [95% t-interval of the mean], n=seeds "
            "(n=n/of where some trials have no value)")


def _aligned(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def _markdown(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def format_pivot(p: dict[str, Any], markdown: bool = False) -> str:
    """The pivot as a terminal table under a line naming its metric, or as a bare markdown table; the
    footnote of its degenerate mark under it."""
    head = ["variant"] + p["schedules"]
    body = [[v] + [cell_text(p["cells"][f"{v}|{s}"], metric=p["metric"]) for s in p["schedules"]]
            for v in p["variants"]]
    notes = pivot_notes(p)
    if markdown:  # a paragraph each
        return _markdown(head, body) + "".join(f"\n\n{n}" for n in notes)
    return f"{pivot_title(p['metric'])}\n\n{_aligned(head, body)}" + ("\n\n" + "\n".join(notes) if notes else "")


# The long form of a pivot (`results --format csv`): one line a cell; degenerate and interpretation_failed
# count the cell's degenerate trials among the n and its trials whose interpretation failed.
PIVOT_CSV_COLUMNS = ["variant", "schedule", "metric", "mean", "std", "ci_low", "ci_high", "n", "of", "degenerate",
                     "interpretation_failed"]


def pivot_csv(p: dict[str, Any]) -> str:
    """The pivot in long form, one line a cell; floats at full precision (they read back equal)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PIVOT_CSV_COLUMNS)
    for v in p["variants"]:
        for s in p["schedules"]:
            c = p["cells"][f"{v}|{s}"]
            w.writerow([v, s, p["metric"], *("" if c.get(k) is None else repr(c[k])
                                              for k in ("mean", "std", "ci_low", "ci_high")),
                        c["n"], c["of"], len(c.get("degenerate") or []), len(c.get("failed") or [])])
    return buf.getvalue()


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)


def pivot_latex(p: dict[str, Any]) -> str:
    """A booktabs tabular: variants as rows, schedules as columns, mean $\\pm$ std over seeds; a dagger
    on cells with a degenerate trial, explained in a row per trial under the table."""
    lines = [f"% {_latex_escape(p['metric'])}: mean $\\pm$ std over seeds (needs \\usepackage{{booktabs}})",
             "\\begin{tabular}{l" + "c" * len(p["schedules"]) + "}", "\\toprule",
             " & ".join(["variant"] + [_latex_escape(s) for s in p["schedules"]]) + " \\\\", "\\midrule"]
    for v in p["variants"]:
        cells = [cell_text(p["cells"][f"{v}|{s}"], " $\\pm$ ", "--", p["metric"], "$^\\dagger$")
                 for s in p["schedules"]]
        lines.append(" & ".join([_latex_escape(v)] + cells) + " \\\\")
    lines.append("\\bottomrule")
    for note in pivot_notes(p):
        mark = "$^\\dagger$ " if note.startswith(DAGGER) else ""
        text = _latex_escape(note.removeprefix(DAGGER).strip())
        lines.append(f"\\multicolumn{{{1 + len(p['schedules'])}}}{{l}}{{\\footnotesize {mark}{text}}} \\\\")
    return "\n".join(lines + ["\\end{tabular}"]) + "\n"


def json_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with NaN as None (null in JSON)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]


def render(rows: list[dict[str, Any]], metric: str = "test_acc", fmt: str = "table") -> str:
    """The pivot of one metric as text in one of FORMATS (json also holds the rows)."""
    if fmt not in FORMATS:
        raise UserError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    p = pivot(rows, metric)
    if fmt == "csv":
        return pivot_csv(p)
    if fmt == "json":
        return json.dumps({"pivot": p, "rows": json_rows(rows)}, indent=2) + "\n"
    if fmt == "latex":
        return pivot_latex(p)
    if fmt == "md":
        return f"{pivot_title(metric)}\n\n{format_pivot(p, markdown=True)}\n"
    return format_pivot(p) + "\n"


def ranked(rows: list[dict[str, Any]], metric: str, top: int | None = None) -> list[dict[str, Any]]:
    """The rows best first by ``metric`` (see better_key), rows without a value last, ties in trial-id
    order; the first ``top`` of them."""
    if metric not in METRICS:
        raise UserError(f"--sort: {metric!r} is not one of {', '.join(METRICS)}")
    better = better_key(metric)

    def key(r: dict[str, Any]) -> tuple[bool, float]:
        v = _number(r.get(metric))
        return v is None, 0.0 if v is None else better(v)

    return sorted(rows, key=key)[:top]


def render_ranked(rows: list[dict[str, Any]], metric: str, fmt: str = "table", top: int | None = None) -> str:
    """The trials best first by ``metric`` (see ranked), as table, md, csv or json."""
    if fmt not in FORMATS:
        raise UserError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "latex":
        raise UserError("--format latex is the pivot's; with --sort use table, md, csv or json")
    best = ranked(rows, metric, top)
    columns = list(dict.fromkeys([*RANK_COLUMNS[:6], metric, *RANK_COLUMNS[6:]]))
    order = "by size" if metric in BY_SIZE else "ascending" if metric in LOWER_IS_BETTER else "descending"
    if fmt == "csv":
        return _rows_csv(best, columns)
    if fmt == "json":
        return json.dumps({"sort": metric, "order": order, "top": top, "of": len(rows),
                           "rows": json_rows([{c: r[c] for c in columns} for r in best])}, indent=2) + "\n"
    better = {"by size": "nearer 0", "ascending": "lower", "descending": "higher"}[order]
    title = f"trials by {metric}, best first ({better} is better; no value last): {len(best)} of {len(rows)}"
    body = [[fmt_value(r[c], c) for c in columns] for r in best]
    table = _markdown(columns, body) if fmt == "md" else _aligned(columns, body)
    return f"{title}\n\n{table}\n"


def _rows_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as CSV: NaN and None empty, True/False as true/false, floats at full precision."""
    def cell(v: Any, column: str) -> Any:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and v.is_integer() and column in WHOLE_COLUMNS:
            return int(v)  # a count: 260, not 260.0
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows({column: cell(v, column) for column, v in r.items()} for r in rows)
    return buf.getvalue()


def fmt_value(v: Any, column: str | None = None) -> str:
    """A table value of ``column`` as text: NaN and None empty; the degenerate flag yes or no; counts
    (WHOLE_COLUMNS) whole, seconds (wall_s) to one decimal, other floats to four."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return ("yes" if v else "no") if column == "degenerate" else str(v)
    if not isinstance(v, (int, float)):
        return str(v)
    if math.isnan(v):
        return ""
    if column in WHOLE_COLUMNS and float(v).is_integer():
        return str(int(v))
    if column in WHOLE_COLUMNS or column == "wall_s":
        return f"{v:.1f}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_tables(sweep_dir: str | Path, metric: str = "test_acc") -> dict[str, Any]:
    """tables/accuracy.{csv,md,json} of a sweep folder; returns the pivot.

    The md file also holds a pivot of each interpretation metric that some trial has.
    """
    from .atomic import atomic_write_text

    sweep_dir = Path(sweep_dir)
    rows = collect_rows(sweep_dir)
    p = pivot(rows, metric)
    tables = sweep_dir / "tables"
    atomic_write_text(tables / "accuracy.csv", _rows_csv(rows, ROW_COLUMNS))
    atomic_write_text(tables / "accuracy.json", json.dumps({"rows": json_rows(rows), "pivot": p}, indent=2))
    extra = [q for q in (pivot(rows, m) for m in INTERPRET_METRICS) if any(c["n"] for c in q["cells"].values())]
    interp = "".join(f"### {q['metric']}\n\n{format_pivot(q, markdown=True)}\n\n" for q in extra)
    md = (f"# {sweep_dir.name}: {metric}\n\n{pivot_title(metric)}.\n\n"
          f"{format_pivot(p, markdown=True)}\n\n"
          + (f"## Interpretation metrics\n\nFrom each trial's interpret/metrics.json.\n\n{interp}" if extra else "")
          + f"## Trials\n\n{_markdown(ROW_COLUMNS, [[fmt_value(r[c], c) for c in ROW_COLUMNS] for r in rows])}\n")
    atomic_write_text(tables / "accuracy.md", md)
    from .compare import write_compare  # it builds on this module's pivots

    write_compare(sweep_dir, rows, metric)
    return p


# ---------------------------------------------------------------------------- pull

# What `pull` copies, relative to the sweep folder: the small files only.
PULL_FILES = ["spec.yaml", "report.html", "tables/**", "figures/**"]
PULL_TRIAL_FILES = [trial_folder.CONFIG, trial_folder.RESULT, trial_folder.HISTORY, trial_folder.ATTEMPTS,
                    trial_folder.ERROR, "trial.log",
                    "tensorboard/*", "interpret/metrics.json", "interpret/error.txt", "interpret/*.png"]


def pull_filters() -> list[str]:
    """rsync filter rules (first match wins) that keep only PULL_FILES and PULL_TRIAL_FILES.

    Heavy or transient files are excluded before anything is included, so no rule below can
    let a checkpoint, a feature dump, Ray's state, a lock or a half-written temp file through.
    """
    rules = ["- *.pt", "- *.h5", "- *.hdf5", "- ray/", "- .*", "- *.tmp", "- *.lock"]
    rules += ["+ /spec.yaml", "+ /report.html", "+ /tables/", "+ /tables/**", "+ /figures/", "+ /figures/**",
              "+ /trials/", "+ /trials/*/", "+ /trials/*/interpret/"]
    rules += [f"+ /trials/*/{name}" for name in PULL_TRIAL_FILES]
    return rules + ["- *"]


def _is_remote(path: str) -> bool:
    """rsync's rule: HOST:PATH (a colon before any slash) or an rsync:// URL."""
    return path.startswith("rsync://") or re.match(r"^[^/]*:", path) is not None


# The [user@]host of an ssh HOST:PATH: a name from the ssh config, a DNS name or an IP address,
# never text that ssh could read as one of its options or a shell could read as syntax.
_SSH_HOST = re.compile(r"(?:[A-Za-z0-9_][\w.-]*@)?(?:[A-Za-z0-9_][\w.-]*|\[[0-9A-Fa-f:.]+\]):", re.ASCII)


def _check_pull_paths(src: str, dest: str) -> None:
    """Refuse a SRC or DEST that rsync or ssh would read as anything but a path."""
    for key, path in (("SRC", src), ("DEST", dest)):
        if path.startswith("-"):
            raise UserError(f"{key} {path!r} begins with '-' and would be read as an option; "
                            f"write ./{path} for a local folder of that name")
    if _is_remote(dest):
        raise UserError(f"DEST {dest!r} looks like HOST:PATH; pull copies from a cluster to here, so DEST is a "
                        f"local folder (write ./{dest} for a local folder whose name has a colon)")
    if _is_remote(src) and not src.startswith("rsync://") and not _SSH_HOST.match(src):
        raise UserError(f"SRC {src!r}: the part before ':' is not an ssh host ([user@]host of letters, digits, "
                        f"'.', '_' and '-'); pass HOST:PATH, or ./{src} for a local folder")


def pull(src: str, dest: str | Path) -> dict[str, Any]:
    """Copy a sweep folder's tables, figures, report and per-trial metrics from src (HOST:PATH over
    ssh, or a local path) to the local folder dest with rsync; never checkpoints or feature dumps.

    Returns {"files": the relative paths copied by this run, "bytes": their size, "dest": dest}.
    """
    src = str(src)
    _check_pull_paths(src, str(dest))
    rsync = shutil.which("rsync")
    if rsync is None:
        raise UserError("rsync not found; install rsync (e.g. `apt install rsync` or `brew install rsync`) "
                        "here and on the cluster")
    remote = _is_remote(src)
    if not remote:
        local = Path(src)
        if not local.is_dir():
            raise UserError(f"{src}: no such folder; pass HOST:PATH/results/<sweep> or a local sweep folder")
        if not any((local / p).exists() for p in ("trials", "tables", "spec.yaml")):
            raise UserError(f"{src}: not a sweep folder (no trials/, tables/ or spec.yaml); pass results/<sweep>")
    dest = Path(dest)
    made = [d for d in (dest, *dest.parents) if not d.exists()]  # innermost first
    dest.mkdir(parents=True, exist_ok=True)
    # -s sends the remote path inside rsync's protocol, so the remote shell never splits or runs it;
    # it is --protect-args before rsync 3.2.7 and --secluded-args from then on, -s in every rsync
    # since 3.0, and it wins over a user's RSYNC_OLD_ARGS. `--` and absolute local paths keep
    # both paths from being read as options.
    cmd = [rsync, "-a", "-s", "--prune-empty-dirs", "--out-format=%n\t%l"]
    cmd += [f"--filter={rule}" for rule in pull_filters()]
    cmd += ["--", (src if remote else str(Path(src).absolute())).rstrip("/") + "/", str(dest.absolute()) + "/"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        for d in made:  # a failed pull leaves no empty folder behind (rmdir keeps what was copied)
            with contextlib.suppress(OSError):
                d.rmdir()
        tail = "; ".join(line.strip() for line in proc.stderr.strip().splitlines()[-3:] if line.strip())
        raise UserError(f"rsync {src} -> {dest} failed (exit {proc.returncode}): {tail or 'no message'}")
    files, size = [], 0
    for line in proc.stdout.splitlines():
        name, _, length = line.rpartition("\t")
        if name and not name.endswith("/"):
            files.append(name)
            size += int(length) if length.isdigit() else 0
    if not any((dest / p).exists() for p in ("trials", "tables", "spec.yaml")):
        raise UserError(f"{src}: nothing of a sweep folder was found there (no trials/, tables/ or spec.yaml); "
                        "pass HOST:PATH/results/<sweep>")
    return {"files": files, "bytes": size, "dest": dest}


def pull_summary(out: dict[str, Any]) -> str:
    n = len(out["files"])
    if n == 0:
        return f"{out['dest']}: up to date (0 files copied)"
    return f"{out['dest']}: copied {n} file{'s' * (n != 1)} ({format_size(out['bytes'])})"
