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
from typing import Any

import numpy as np

from .config import SCHEDULES, VARIANTS
from .errors import UserError, format_size

# The interpretation metrics taken from trials/<id>/interpret/metrics.json ["summary"].
INTERPRET_METRICS = ["ari", "nmi", "purity", "ece", "deletion_auc", "insertion_auc", "sanity_rho"]
ROW_COLUMNS = ["trial_id", "variant", "lr_schedule", "seed", "status", "note", "epochs", "best_valid_acc",
               "best_epoch", "test_acc", *INTERPRET_METRICS, "wall_s"]
# The columns `pivot` aggregates over seeds.
METRICS = ["test_acc", "best_valid_acc", "best_epoch", "epochs", *INTERPRET_METRICS, "wall_s"]
FORMATS = ("table", "md", "csv", "json", "latex")
# The metrics where lower is better (calibration error, deletion AUC, the CAM's correlation with a
# randomized model's, time): `results --sort` ranks these ascending, every other one descending.
LOWER_IS_BETTER = ("ece", "deletion_auc", "sanity_rho", "wall_s")
# The columns of `results --sort`; the metric ranked by comes after status.
RANK_COLUMNS = ["trial_id", "variant", "lr_schedule", "seed", "status", "test_acc", "best_valid_acc", "epochs",
                "wall_s"]
# Counts, printed as whole numbers (a mean over seeds with one decimal); seconds get one decimal, the
# rest (accuracies, scores) four. CSV and JSON keep every digit.
WHOLE_COLUMNS = ("seed", "epochs", "best_epoch")


def trial_status(trial_dir: Path) -> str:
    """completed | diverged (from result.json), failed (error.txt), running/pending otherwise."""
    result = trial_dir / "result.json"
    if result.is_file():
        return json.loads(result.read_text())["status"]
    if (trial_dir / "error.txt").is_file():
        return "failed"
    return "running" if (trial_dir / "checkpoint.pt").is_file() else "pending"


def trial_note(trial_dir: Path, status: str) -> str:
    """Why a trial has no result: the last line of its error (failed), or that it never started."""
    if status == "failed":
        lines = [x for x in (trial_dir / "error.txt").read_text(errors="replace").splitlines() if x.strip()]
        return lines[-1].strip() if lines else "failed"
    return "not started" if status == "pending" else ""


def _interpret_summary(trial_dir: Path) -> dict[str, float]:
    """The seven interpretation metrics of a trial; NaN for each one its metrics.json lacks."""
    out = dict.fromkeys(INTERPRET_METRICS, math.nan)
    path = trial_dir / "interpret" / "metrics.json"
    if not path.is_file():
        return out
    try:
        summary = json.loads(path.read_text()).get("summary") or {}
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e}); delete it and run `vgg-xai postprocess` again") from None
    for k in INTERPRET_METRICS:
        v = summary.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def _from_float32(x: float) -> float:
    """An exact float32 value (an accuracy computed in float32, 0.21299999952316284) as the shortest
    decimal that reads back to it (0.213); any other value as it is."""
    if not math.isfinite(x) or float(np.float32(x)) != x:
        return x
    return float(str(np.float32(x)))


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _from_float32(v) if isinstance(v, float) else v for k, v in row.items()}


def collect_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per trial folder (sorted by trial id)."""
    rows = []
    for d in sorted(Path(sweep_dir, "trials").iterdir()) if Path(sweep_dir, "trials").is_dir() else []:
        cfg_file = d / "config.json"
        if not cfg_file.is_file():
            continue
        cfg = json.loads(cfg_file.read_text())
        status = trial_status(d)
        row: dict[str, Any] = {"trial_id": d.name, "variant": cfg["variant"], "lr_schedule": cfg["lr_schedule"],
                               "seed": cfg["seed"], "status": status, "note": trial_note(d, status), "epochs": 0,
                               "best_valid_acc": math.nan, "best_epoch": 0, "test_acc": math.nan,
                               **_interpret_summary(d), "wall_s": math.nan}
        history = d / "history.csv"
        if history.is_file():  # a running trial: the epochs it has done so far
            done = list(csv.DictReader(history.open()))
            row["epochs"] = sum(1 for h in done if h["status"] == "ok")
            valid = [float(h["valid_acc"]) for h in done if h["status"] == "ok"]
            if valid:
                row.update(best_valid_acc=max(valid), best_epoch=valid.index(max(valid)) + 1)
        if (d / "result.json").is_file():
            r = json.loads((d / "result.json").read_text())
            num = lambda k: math.nan if r[k] is None else r[k]  # noqa: E731 - null: undefined (diverged)
            row.update(epochs=r["epochs_completed"], best_valid_acc=num("best_valid_acc"), best_epoch=r["best_epoch"],
                       test_acc=num("test_acc"), wall_s=num("wall_s"))
        rows.append(_clean(row))
    return rows


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
        return [_clean({c: math.nan if r.get(c) is None and c in METRICS else r.get(c) for c in ROW_COLUMNS})
                for r in saved]
    raise UserError(f"{sweep_dir}: not a sweep folder (no trials/ or tables/accuracy.json); pass results/<sweep>, "
                    f"or copy one from a cluster with `vgg-xai results pull HOST:PATH {sweep_dir}`")


def pivot(rows: list[dict[str, Any]], metric: str = "test_acc") -> dict[str, Any]:
    """variant x schedule -> mean, std (ddof=1 over seeds; 0 for one seed) and n of a metric.

    Only completed trials count; n is how many had a value, of how many trials the cell holds.
    """
    if metric not in METRICS:
        raise UserError(f"metric: {metric!r} is not one of {', '.join(METRICS)}")
    known_v, known_s = list(VARIANTS), list(SCHEDULES)
    order = lambda known: (lambda x: (known.index(x) if x in known else len(known), x))  # noqa: E731
    variants = sorted({r["variant"] for r in rows}, key=order(known_v))
    schedules = sorted({r["lr_schedule"] for r in rows}, key=order(known_s))
    cells: dict[str, dict[str, Any]] = {}
    for v in variants:
        for s in schedules:
            group = [r for r in rows if r["variant"] == v and r["lr_schedule"] == s]
            vals = [float(r[metric]) for r in group
                    if r["status"] == "completed" and r[metric] is not None and math.isfinite(float(r[metric]))]
            statuses = sorted({r["status"] for r in group})
            cells[f"{v}|{s}"] = {
                "mean": float(np.mean(vals)) if vals else None,
                "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else (0.0 if vals else None),
                "n": len(vals), "of": len(group), "statuses": statuses,
            }
    return {"metric": metric, "variants": variants, "schedules": schedules, "cells": cells}


def cell_text(c: dict[str, Any], pm: str = " ± ", missing: str | None = None, metric: str | None = None) -> str:
    """One pivot cell of ``metric`` as text: mean, ``pm`` std when there are several seeds, (n/of) when
    some trials have no value; ``missing`` (default: the trials' statuses) when none has."""
    if c["of"] == 0:
        return ""
    if c["mean"] is None:
        return "/".join(c["statuses"]) if missing is None else missing
    text = fmt_value(c["mean"], metric) + (f"{pm}{fmt_value(c['std'], metric)}" if c["n"] > 1 else "")
    return text + (f" ({c['n']}/{c['of']})" if c["n"] < c["of"] else "")


def pivot_title(metric: str) -> str:
    return f"{metric}: mean ± std over seeds (n/of where some trials have no value)"


def _aligned(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def _markdown(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def format_pivot(p: dict[str, Any], markdown: bool = False) -> str:
    """The pivot as a terminal table under a line naming its metric, or as a bare markdown table."""
    head = ["variant"] + p["schedules"]
    body = [[v] + [cell_text(p["cells"][f"{v}|{s}"], metric=p["metric"]) for s in p["schedules"]]
            for v in p["variants"]]
    if markdown:
        return _markdown(head, body)
    return f"{pivot_title(p['metric'])}\n\n{_aligned(head, body)}"


def pivot_csv(p: dict[str, Any]) -> str:
    """The pivot in long form, one line a cell; floats at full precision (they read back equal)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "schedule", "metric", "mean", "std", "n", "of"])
    for v in p["variants"]:
        for s in p["schedules"]:
            c = p["cells"][f"{v}|{s}"]
            w.writerow([v, s, p["metric"], "" if c["mean"] is None else repr(c["mean"]),
                        "" if c["std"] is None else repr(c["std"]), c["n"], c["of"]])
    return buf.getvalue()


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)


def pivot_latex(p: dict[str, Any]) -> str:
    """A booktabs tabular: variants as rows, schedules as columns, mean $\\pm$ std over seeds."""

    lines = [f"% {_latex_escape(p['metric'])}: mean $\\pm$ std over seeds (needs \\usepackage{{booktabs}})",
             "\\begin{tabular}{l" + "c" * len(p["schedules"]) + "}", "\\toprule",
             " & ".join(["variant"] + [_latex_escape(s) for s in p["schedules"]]) + " \\\\", "\\midrule"]
    for v in p["variants"]:
        cells = [cell_text(p["cells"][f"{v}|{s}"], " $\\pm$ ", "--", p["metric"]) for s in p["schedules"]]
        lines.append(" & ".join([_latex_escape(v)] + cells) + " \\\\")
    return "\n".join(lines + ["\\bottomrule", "\\end{tabular}"]) + "\n"


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
    """The rows best first by ``metric`` (ascending where LOWER_IS_BETTER), rows without a value last,
    ties in trial-id order; the first ``top`` of them."""
    if metric not in METRICS:
        raise UserError(f"--sort: {metric!r} is not one of {', '.join(METRICS)}")
    sign = 1 if metric in LOWER_IS_BETTER else -1

    def key(r: dict[str, Any]) -> tuple[bool, float]:
        v = r.get(metric)
        missing = v is None or not math.isfinite(float(v))
        return missing, 0.0 if missing else sign * float(v)

    return sorted(rows, key=key)[:top]


def render_ranked(rows: list[dict[str, Any]], metric: str, fmt: str = "table", top: int | None = None) -> str:
    """The trials best first by ``metric`` (see ranked), as table, md, csv or json."""
    if fmt not in FORMATS:
        raise UserError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "latex":
        raise UserError("--format latex is the pivot's; with --sort use table, md, csv or json")
    best = ranked(rows, metric, top)
    columns = list(dict.fromkeys([*RANK_COLUMNS[:5], metric, *RANK_COLUMNS[5:]]))
    order = "ascending" if metric in LOWER_IS_BETTER else "descending"
    if fmt == "csv":
        return _rows_csv(best, columns)
    if fmt == "json":
        return json.dumps({"sort": metric, "order": order, "top": top, "of": len(rows),
                           "rows": json_rows([{c: r[c] for c in columns} for r in best])}, indent=2) + "\n"
    title = (f"trials by {metric}, best first ({'lower' if order == 'ascending' else 'higher'} is better; "
             f"no value last): {len(best)} of {len(rows)}")
    body = [[fmt_value(r[c], c) for c in columns] for r in best]
    table = _markdown(columns, body) if fmt == "md" else _aligned(columns, body)
    return f"{title}\n\n{table}\n"


def _rows_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as CSV: NaN empty, floats at full precision."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows)
    return buf.getvalue()


def fmt_value(v: Any, column: str | None = None) -> str:
    """A table value of ``column`` as text: NaN empty; counts (WHOLE_COLUMNS) whole, seconds (wall_s)
    to one decimal, other floats to four."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
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
    from .checkpoint import atomic_write_text

    sweep_dir = Path(sweep_dir)
    rows = collect_rows(sweep_dir)
    p = pivot(rows, metric)
    tables = sweep_dir / "tables"
    atomic_write_text(tables / "accuracy.csv", _rows_csv(rows, ROW_COLUMNS))
    atomic_write_text(tables / "accuracy.json", json.dumps({"rows": json_rows(rows), "pivot": p}, indent=2))
    extra = [q for q in (pivot(rows, m) for m in INTERPRET_METRICS) if any(c["n"] for c in q["cells"].values())]
    interp = "".join(f"### {q['metric']}\n\n{format_pivot(q, markdown=True)}\n\n" for q in extra)
    md = (f"# {sweep_dir.name}: {metric}\n\nMean ± std over seeds (n/of where some trials did not complete).\n\n"
          f"{format_pivot(p, markdown=True)}\n\n"
          + (f"## Interpretation metrics\n\nFrom each trial's interpret/metrics.json.\n\n{interp}" if extra else "")
          + f"## Trials\n\n{_markdown(ROW_COLUMNS, [[fmt_value(r[c], c) for c in ROW_COLUMNS] for r in rows])}\n")
    atomic_write_text(tables / "accuracy.md", md)
    return p


# ---------------------------------------------------------------------------- pull

# What `pull` copies, relative to the sweep folder: the small files only.
PULL_FILES = ["spec.yaml", "report.html", "tables/**", "figures/**"]
PULL_TRIAL_FILES = ["config.json", "result.json", "history.csv", "attempts.jsonl", "error.txt", "trial.log",
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
