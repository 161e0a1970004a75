"""Which cells of a sweep differ beyond the noise between seeds (`vgg-xai results --compare`).

Within each schedule every variant is compared with a reference variant, and within each variant
every schedule with a reference schedule (defaults: the study's first, `plain` and `const_1e-3`,
where the sweep has them; `compare:` in the spec or `--ref-variant` / `--ref-schedule` choose
others). A row holds both cells (mean, std, n), the difference of means with its 95% interval, the
test and its p-value, the p-value adjusted by Holm over every row of the metric, and a verdict:

    beyond seed noise       adjusted p < 0.05
    within seed noise       adjusted p >= 0.05
    one seed: no verdict    a cell has a single seed, so no spread to compare with
    no value: no verdict    a cell has no value (not completed, or the analysis was skipped)

A collapsed trial's value is part of its cell (it is what that configuration gave with that seed);
a cell that mixes collapsed and learning seeds is flagged, and tested without assuming a Gaussian
spread (stats.two_sample). For every row without a "beyond" verdict, the seeds per cell that would
decide a difference of its size at 80% power, from the two cells' spreads or, where a cell has one
seed, from the spread within cells pooled over the sweep, and the `--set` flags that run them.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import yaml

from . import stats
from .config import SCHEDULES, VARIANTS
from .errors import UserError
from .results import _aligned, _markdown, _rows_csv, better_key, fmt_value, json_rows, pivot

BEYOND, WITHIN, ONE_SEED, NO_VALUE = ("beyond seed noise", "within seed noise", "one seed: no verdict",
                                      "no value: no verdict")
COLUMNS = ["kind", "within", "cell", "reference", "mean", "std", "n", "ref_mean", "ref_std", "ref_n", "diff",
           "ci_low", "ci_high", "test", "p", "p_holm", "verdict", "mixed", "seeds_needed", "spread_from", "add"]


def spec_reference(sweep_dir: str | Path) -> dict[str, str]:
    """The `compare:` section of a sweep's spec.yaml ({} where it has none or no spec)."""
    path = Path(sweep_dir) / "spec.yaml"
    try:
        saved = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); restore it or delete it") from None
    ref = saved.get("compare") if isinstance(saved, dict) else None
    return {k: str(v) for k, v in ref.items() if k in ("variant", "schedule")} if isinstance(ref, dict) else {}


def default_reference(names: list[str], known: tuple[str, ...] | list[str], asked: str | None, what: str) -> str:
    """``asked`` where the sweep has it, else the study's first name the sweep has, else its first."""
    if asked is not None:
        if asked not in names:
            raise UserError(f"--ref-{what}: {asked!r} is not a {what} of this sweep ({', '.join(names)})")
        return asked
    return next((k for k in known if k in names), names[0])


def compare(rows: list[dict[str, Any]], metric: str = "test_acc", ref_variant: str | None = None,
            ref_schedule: str | None = None) -> dict[str, Any]:
    """The comparisons of one metric (see the module); rows as results.collect_rows gives them."""
    p = pivot(rows, metric)
    if not p["variants"]:
        raise UserError("--compare: the sweep has no trials to compare")
    rv = default_reference(p["variants"], list(VARIANTS), ref_variant, "variant")
    rs = default_reference(p["schedules"], list(SCHEDULES), ref_schedule, "schedule")
    cells = p["cells"]
    spread, dof = stats.pooled_sd([c["values"] for c in cells.values()])
    pairs = [("variant", s, f"{v}|{s}", f"{rv}|{s}") for s in p["schedules"] for v in p["variants"] if v != rv]
    pairs += [("schedule", v, f"{v}|{s}", f"{v}|{rs}") for v in p["variants"] for s in p["schedules"] if s != rs]
    out = [_row(kind, within, cells[a], cells[b], a, b) for kind, within, a, b in pairs
           if cells[a]["of"] and cells[b]["of"]]
    for r, adjusted in zip(out, stats.holm([r["p"] for r in out])):
        r["p_holm"] = adjusted
        if r["verdict"] is None:
            r["verdict"] = BEYOND if adjusted < stats.ALPHA else WITHIN
    for r in out:
        _seeds(r, cells, spread)
    return {"metric": metric, "ref_variant": rv, "ref_schedule": rs, "level": stats.LEVEL, "alpha": stats.ALPHA,
            "power": stats.POWER, "tests": sum(math.isfinite(r["p"]) for r in out), "pooled_sd": spread,
            "pooled_dof": dof, "higher_is_better": better_key(metric)(1.0) < better_key(metric)(0.0), "rows": out}


def _row(kind: str, within: str, a: dict[str, Any], b: dict[str, Any], key_a: str, key_b: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "kind": kind, "within": within, "cell": key_a, "reference": key_b,
        "mean": a["mean"], "std": a["std"], "n": a["n"], "ref_mean": b["mean"], "ref_std": b["std"], "ref_n": b["n"],
        "diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "test": "", "p": math.nan, "p_holm": math.nan,
        "verdict": None, "mixed": bool(a.get("mixed") or b.get("mixed")), "seeds_needed": None, "spread_from": "",
        "add": "",
    }
    if not a["n"] or not b["n"]:
        row["verdict"] = NO_VALUE
        return row
    row["diff"] = a["mean"] - b["mean"]
    if a["n"] < 2 or b["n"] < 2:
        row["verdict"] = ONE_SEED
        return row
    t = stats.two_sample(a["values"], b["values"], mixed=row["mixed"])
    row.update(ci_low=t["low"], ci_high=t["high"], test=t["test"], p=t["p"])
    return row


def _seeds(row: dict[str, Any], cells: dict[str, dict[str, Any]], spread: float) -> None:
    """For a row without a verdict of beyond: the seeds per cell that would decide it, and how to add them."""
    if row["verdict"] in (BEYOND, NO_VALUE):
        return
    if row["n"] >= 2 and row["ref_n"] >= 2:
        sd_a, sd_b, row["spread_from"] = row["std"], row["ref_std"], "these cells"
    elif math.isfinite(spread):
        sd_a = sd_b = spread
        row["spread_from"] = "pooled within cells"
    else:
        row["spread_from"] = "unknown: no cell has two seeds"
        return
    need = stats.seeds_needed(row["diff"], sd_a, sd_b)
    row["seeds_needed"] = need
    if need is None:
        return
    lines = []
    for key in (row["cell"], row["reference"]):
        have = set(cells[key].get("seeds") or [])
        new = [s for s in range(need + len(have)) if s not in have][: max(0, need - len(have))]
        v, s = key.split("|")
        if new and lines and lines[-1][2] == new:  # both cells lack the same seeds: one line crosses them
            variants, schedules, _ = lines[-1]
            lines[-1] = (variants + [v] * (v not in variants), schedules + [s] * (s not in schedules), new)
        elif new:
            lines.append(([v], [s], new))
    row["add"] = "; ".join(f"--set 'grid.variant=[{', '.join(v)}]' --set 'grid.lr_schedule=[{', '.join(s)}]' "
                           f"--set 'grid.seed=[{', '.join(map(str, new))}]'" for v, s, new in lines)

def _name(key: str, kind: str) -> str:
    v, s = key.split("|")
    return v if kind == "variant" else s


def _num(v: Any, digits: int = 4, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _p(v: float) -> str:
    if not math.isfinite(v):
        return ""
    return f"{v:.2g}" if v < 0.001 else f"{v:.3f}"


def _cell(mean: Any, std: Any, n: int, metric: str) -> str:
    if not n:
        return "no value"
    return fmt_value(mean, metric) + (f" ± {fmt_value(std, metric)}" if n > 1 else "") + f" n={n}"


def table_rows(c: dict[str, Any], kind: str) -> list[list[str]]:
    m = c["metric"]
    out = []
    for r in c["rows"]:
        if r["kind"] != kind:
            continue
        diff = "" if not math.isfinite(r["diff"]) else _num(r["diff"], sign=True)
        if math.isfinite(r["ci_low"]):
            diff += f" [{_num(r['ci_low'], sign=True)}, {_num(r['ci_high'], sign=True)}]"
        need = "" if r["verdict"] in (BEYOND, NO_VALUE) else (
            f"{r['seeds_needed']}" if r["seeds_needed"] else ("> 1000" if r["spread_from"] and
                                                                 not r["spread_from"].startswith("unknown") else "?"))
        out.append([r["within"], _name(r["cell"], kind), _cell(r["mean"], r["std"], r["n"], m),
                    _cell(r["ref_mean"], r["ref_std"], r["ref_n"], m), diff,
                    {"welch": "Welch t", "permutation": "permutation"}.get(r["test"], ""), _p(r["p"]),
                    _p(r["p_holm"]), r["verdict"] + (" (mixed)" if r["mixed"] else ""), need])
    return out


def header(c: dict[str, Any]) -> str:
    better = "higher" if c["higher_is_better"] else "lower"
    tests = f"{c['tests']} test{'s' * (c['tests'] != 1)}"
    return "\n".join(textwrap.wrap(
        f"{c['metric']}: differences between cells over seeds ({better} is better): the difference of means "
        f"[95% interval]; Welch's t-test, or the exact permutation test where a cell's seeds have no spread or "
        f"mix collapsed and learning trials (mixed); p adjusted by Holm over the {tests}; seeds: per "
        f"cell, to decide a difference of that size at 80% power", 110))


def footer(c: dict[str, Any]) -> list[str]:
    lines = []
    if math.isfinite(c["pooled_sd"]):
        lines.append(f"spread within cells, pooled over the cells with several seeds: "
                     f"{fmt_value(c['pooled_sd'], c['metric'])} ({c['pooled_dof']} degrees of freedom); "
                     "it sizes the seeds of comparisons with a one-seed cell")
    elif c["rows"]:
        lines.append("seeds ?: no cell has two seeds, so the spread between seeds, and the seeds a comparison "
                     "needs, are unknown; run two seeds or more of the cells to compare (--set 'grid.seed=[0, 1]')")
    for r in c["rows"]:
        if r["add"]:
            lines.append(f"{r['cell'].replace('|', ' at ')} vs {r['reference'].replace('|', ' at ')}: "
                         f"{r['seeds_needed']} seeds per cell; add them with {r['add'].replace('; ', ' and with ')}")
    return lines


HEAD = {"variant": ["schedule", "variant", "value", "reference", "difference [95% CI]", "test", "p", "p (Holm)",
                    "verdict", "seeds"],
        "schedule": ["variant", "schedule", "value", "reference", "difference [95% CI]", "test", "p", "p (Holm)",
                     "verdict", "seeds"]}


def format_compare(c: dict[str, Any], markdown: bool = False) -> str:
    """The comparisons as terminal tables (or markdown), one per kind, under the header line."""
    table = _markdown if markdown else _aligned
    parts = [header(c)]
    for kind, ref in (("variant", c["ref_variant"]), ("schedule", c["ref_schedule"])):
        body = table_rows(c, kind)
        if body:
            parts += [f"within each {'schedule' if kind == 'variant' else 'variant'}, every {kind} against {ref}:",
                      table(HEAD[kind], body)]
    if len(parts) == 1:
        parts.append("nothing to compare: the sweep has one variant and one schedule")
    foot = footer(c)
    return "\n\n".join(parts) + ("\n\n" + "\n".join(foot) if foot else "") + "\n"


def compare_csv(c: dict[str, Any]) -> str:
    return _rows_csv([{"metric": c["metric"], **r} for r in c["rows"]], ["metric", *COLUMNS])


def render_compare(rows: list[dict[str, Any]], metric: str = "test_acc", fmt: str = "table",
                   ref_variant: str | None = None, ref_schedule: str | None = None) -> str:
    if fmt == "latex":
        raise UserError("--format latex is the pivot's; with --compare use table, md, csv or json")
    c = compare(rows, metric, ref_variant, ref_schedule)
    if fmt == "csv":
        return compare_csv(c)
    if fmt == "json":
        return json.dumps({**c, "rows": json_rows(c["rows"])}, indent=2) + "\n"
    return format_compare(c, markdown=fmt == "md")


def write_compare(sweep_dir: str | Path, rows: list[dict[str, Any]], metric: str = "test_acc") -> dict[str, Any]:
    """tables/compare.{csv,md,json} of a sweep folder, with the references its spec names; returns them."""
    from .atomic import atomic_write_text

    ref = spec_reference(sweep_dir)
    c = compare(rows, metric, ref.get("variant"), ref.get("schedule")) if rows else None
    tables = Path(sweep_dir) / "tables"
    if c is None:
        return {}
    atomic_write_text(tables / "compare.csv", compare_csv(c))
    atomic_write_text(tables / "compare.json", json.dumps({**c, "rows": json_rows(c["rows"])}, indent=2))
    atomic_write_text(tables / "compare.md", f"# {Path(sweep_dir).name}: which differences are real\n\n"
                                             + format_compare(c, markdown=True))
    return c
