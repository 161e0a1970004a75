"""Read a sweep's trial folders, aggregate them, and write/print the accuracy tables."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import atomic_write_text
from .config import SCHEDULES, VARIANTS

ROW_COLUMNS = ["trial_id", "variant", "lr_schedule", "seed", "status", "epochs", "best_valid_acc",
               "best_epoch", "test_acc", "wall_s"]


def trial_status(trial_dir: Path) -> str:
    """completed | diverged (from result.json), failed (error.txt), running/pending otherwise."""
    result = trial_dir / "result.json"
    if result.is_file():
        return json.loads(result.read_text())["status"]
    if (trial_dir / "error.txt").is_file():
        return "failed"
    return "running" if (trial_dir / "checkpoint.pt").is_file() else "pending"


def collect_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per trial folder (sorted by trial id)."""
    rows = []
    for d in sorted(Path(sweep_dir, "trials").iterdir()) if Path(sweep_dir, "trials").is_dir() else []:
        cfg_file = d / "config.json"
        if not cfg_file.is_file():
            continue
        cfg = json.loads(cfg_file.read_text())
        row: dict[str, Any] = {"trial_id": d.name, "variant": cfg["variant"], "lr_schedule": cfg["lr_schedule"],
                               "seed": cfg["seed"], "status": trial_status(d), "epochs": 0,
                               "best_valid_acc": math.nan, "best_epoch": 0, "test_acc": math.nan, "wall_s": math.nan}
        history = d / "history.csv"
        if history.is_file():  # a running trial: the epochs it has done so far
            done = list(csv.DictReader(history.open()))
            row["epochs"] = sum(1 for h in done if h["status"] == "ok")
            valid = [float(h["valid_acc"]) for h in done if h["status"] == "ok"]
            if valid:
                row.update(best_valid_acc=max(valid), best_epoch=valid.index(max(valid)) + 1)
        if (d / "result.json").is_file():
            r = json.loads((d / "result.json").read_text())
            row.update(epochs=r["epochs_completed"], best_valid_acc=r["best_valid_acc"], best_epoch=r["best_epoch"],
                       test_acc=r["test_acc"], wall_s=r["wall_s"])
        rows.append(row)
    return rows


def pivot(rows: list[dict[str, Any]], metric: str = "test_acc") -> dict[str, Any]:
    """variant x schedule -> mean, std (ddof=1 over seeds; 0 for one seed) and n of a metric."""
    known_v, known_s = list(VARIANTS), list(SCHEDULES)
    order = lambda known: (lambda x: (known.index(x) if x in known else len(known), x))  # noqa: E731
    variants = sorted({r["variant"] for r in rows}, key=order(known_v))
    schedules = sorted({r["lr_schedule"] for r in rows}, key=order(known_s))
    cells: dict[str, dict[str, Any]] = {}
    for v in variants:
        for s in schedules:
            group = [r for r in rows if r["variant"] == v and r["lr_schedule"] == s]
            vals = [float(r[metric]) for r in group if r["status"] == "completed" and math.isfinite(float(r[metric]))]
            statuses = sorted({r["status"] for r in group})
            cells[f"{v}|{s}"] = {
                "mean": float(np.mean(vals)) if vals else None,
                "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else (0.0 if vals else None),
                "n": len(vals), "of": len(group), "statuses": statuses,
            }
    return {"metric": metric, "variants": variants, "schedules": schedules, "cells": cells}


def _cell_text(c: dict[str, Any]) -> str:
    if c["of"] == 0:
        return ""
    if c["mean"] is None:
        return "/".join(c["statuses"])
    text = f"{c['mean']:.4f}" + (f" ± {c['std']:.4f}" if c["n"] > 1 else "")
    return text + (f" ({c['n']}/{c['of']})" if c["n"] < c["of"] else "")


def format_pivot(p: dict[str, Any], markdown: bool = False) -> str:
    head = ["variant"] + p["schedules"]
    body = [[v] + [_cell_text(p["cells"][f"{v}|{s}"]) for s in p["schedules"]] for v in p["variants"]]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def _rows_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(ROW_COLUMNS) + " |", "|" + "---|" * len(ROW_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in ROW_COLUMNS) + " |")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def write_tables(sweep_dir: str | Path, metric: str = "test_acc") -> dict[str, Any]:
    """tables/accuracy.{csv,md,json} of a sweep folder; returns the pivot."""
    sweep_dir = Path(sweep_dir)
    rows = collect_rows(sweep_dir)
    p = pivot(rows, metric)
    tables = sweep_dir / "tables"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ROW_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows)
    atomic_write_text(tables / "accuracy.csv", buf.getvalue())
    json_rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    atomic_write_text(tables / "accuracy.json", json.dumps({"rows": json_rows, "pivot": p}, indent=2))
    md = (f"# {sweep_dir.name}: {metric}\n\nMean ± std over seeds (n/of where some trials did not complete).\n\n"
          f"{format_pivot(p, markdown=True)}\n\n## Trials\n\n{_rows_markdown(rows)}\n")
    atomic_write_text(tables / "accuracy.md", md)
    return p
