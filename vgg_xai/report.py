"""report.html: one page per sweep, light enough to open at once (no network, no scripts).

Tables first (pivots with the best cell marked, the trials, the interpretation scores beside their
baselines), then where the results come from (a provenance block), then every figure as an inline
thumbnail, small but at a size its labels read at (THUMB_SCALE), that links to its full PNG by a path
relative to the sweep folder: the page keeps working when the folder is copied, and `vgg-xai results
pull` copies those PNGs with it.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import trial_folder
from .atomic import atomic_write_text
from .compare import compare, spec_reference
from .features import read_provenance
from .postprocess import IMAGES_RULE
from .results import DAGGER, best_cells, cell_text, collect_rows, fmt_value, ordered, pivot, read_interpretation

SWEEP_FIGURES = {
    "accuracy": "Test accuracy by variant and schedule (mean and std over seeds; dashed: chance)",
    "valid_curves": "Validation accuracy of every trial, by variant",
    "cam_grid": "Class activation maps of the probe images, every trial (variant x schedule)",
    "tsne_grid": "t-SNE of the test-set feature vectors, every trial (variant x schedule)",
}
FIRST_FIGURES = ("accuracy", "valid_curves")  # shown under the accuracy pivot, at the top
TRIAL_FIGURES = {
    "curves": "Loss and accuracy",
    "confusion": "Confusion matrix, per-class accuracy, reliability diagram (ECE)",
    "cam": "Class activation maps",
    "faithfulness": "CAM faithfulness: deletion and insertion against a random map",
    "sanity": "Model-randomization check (cascading, from the top)",
    "tsne_gmm": "t-SNE by label and by GMM cluster",
    "bic": "BIC scan of Gaussian mixtures",
    "contingency": "GMM cluster x class",
    "filters_first": "First conv layer: filters, untrained and trained",
    "fmaps_first": "First conv layer: feature maps",
    "filters_last": "Last conv layer: filters, untrained and trained on one scale, and their difference",
    "fmaps_last": "Last conv layer: feature maps",
    "through_layers": "One probe image through every conv layer",
    "bn_histograms": "Activations before and after each BatchNorm",
}
# The analyses (keys of metrics.json's "skipped") each figure is drawn from: a figure of a skipped
# analysis is left out of the page, even where an earlier run left its PNG. A figure named like an
# analysis belongs to it too.
FIGURE_ANALYSES = {
    "tsne_gmm": ("tsne", "gmm"), "bic": ("gmm",), "contingency": ("gmm",),
    "cam_grid": ("cam",), "tsne_grid": ("tsne",),
}
METRICS = {  # pivots shown besides test accuracy, when any trial has the value
    "best_valid_acc": "best validation accuracy", "ece": "expected calibration error (lower is better)",
    "ari": "GMM clusters vs labels: adjusted Rand index",
    "nmi": "GMM clusters vs labels: normalized mutual information",
    "deletion_auc": "CAM deletion AUC (lower is better), beside a random map's",
    "deletion_vs_random": "CAM deletion AUC, the map minus the random map on the same image (below 0: faithful)",
    "insertion_auc": "CAM insertion AUC (higher is better), beside a random map's",
    "insertion_vs_random": "CAM insertion AUC, the map minus the random map on the same image (above 0: faithful)",
    "sanity_rho": "Spearman correlation of the CAM after randomizing every layer (near 0 is good), beside its "
                  "noise floor (the same between trained maps of different images)",
    "sanity_abs_rank_rho": "ABS: Spearman correlation of the absolute unrectified CAM after randomizing every layer "
                           "(at or below its noise floor, beside it, is good)",
}
BASELINES = {"deletion_auc": "deletion_auc_random", "insertion_auc": "insertion_auc_random",
             "sanity_rho": "sanity_floor", "sanity_abs_rank_rho": "sanity_abs_floor"}
BASELINE_NAMES = {"deletion_auc_random": "random", "insertion_auc_random": "random", "sanity_floor": "floor",
                  "sanity_abs_floor": "floor"}
# An inline thumbnail is its figure scaled by one factor, not to one size, so that its text reads at one
# size whatever the figure's: viz draws at 100 dpi, where 10-point text is 14 px high and 7-point ticks 10 px;
# at 0.65 they are 9 and 6.3 px, as small as labels read on a screen. The sweep's figures, grids of every
# trial with the smallest labels, are scaled less. None is wider than the page's column.
THUMB_SCALE = 0.65
SWEEP_THUMB_SCALE = 0.8
PAGE_PX = 1340  # the column's width in a 1,400 px window: less body's padding and a scrollbar
# WebP's quality and its slowest, smallest method: text stays sharp at these sizes and a trial's 14 figures
# weigh about 230 kB (10 trials of jobs/cpu.yaml: 3.2 MB in all, 0.8 s a trial to encode).
THUMB_QUALITY, WEBP_METHOD = 40, 6
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child,td.text,th.text{text-align:left}
td.best{font-weight:bold;background:#e3f3e3}
tr.degenerate td{background:#fff3e0} .base{display:block;color:#777;font-size:.85em}
.figs{display:flex;flex-wrap:wrap;gap:.6em;align-items:flex-start}
figure{margin:0;max-width:100%} figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555} .muted{color:#777} .foot{font-size:.85em;color:#555}
.banner{border-left:4px solid #e08a00;background:#fff3e0;padding:.4em .8em;margin:.6em 0}
.banner ul{margin:.2em 0} pre{background:#f7f7f7;padding:.6em;overflow:auto}
table.kv td:first-child{font-weight:bold;white-space:nowrap;vertical-align:top} table.kv td{text-align:left}
nav a{margin-right:1em} .wide{overflow-x:auto} table.interp td{white-space:nowrap}
"""


# ---------------------------------------------------------------------------- figures


def _thumbnail(path: Path, scale: float) -> tuple[str, int, int]:
    """A PNG scaled by ``scale`` (no wider than the page) as a data URI (WebP, or JPEG where Pillow has no
    WebP), and its size."""
    from PIL import Image, features

    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    flat = Image.new("RGB", rgba.size, "white")
    flat.paste(rgba, mask=rgba.getchannel("A"))
    scale = min(scale, PAGE_PX / flat.width, 1.0)
    if scale < 1:
        flat = flat.resize((round(flat.width * scale), round(flat.height * scale)), Image.Resampling.LANCZOS)
    fmt = "WEBP" if features.check("webp") else "JPEG"
    buf = io.BytesIO()
    flat.save(buf, fmt, quality=THUMB_QUALITY, **({"method": WEBP_METHOD} if fmt == "WEBP" else {}))
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"data:image/{fmt.lower()};base64,{data}", flat.width, flat.height


def _figure(sweep_dir: Path, path: Path, caption: str, scale: float = THUMB_SCALE) -> str:
    """A thumbnail that links to the full PNG, by its path relative to the sweep folder; its caption wraps
    at the thumbnail's width."""
    src, w, h = _thumbnail(path, scale)
    href = html.escape(quote(path.relative_to(sweep_dir).as_posix()))
    cap = html.escape(caption)
    return (f'<figure style="width:{w + 2}px"><a href="{href}">'  # + 2: the image's border
            f'<img src="{src}" width="{w}" height="{h}" alt="{cap}"></a>'
            f'<figcaption>{cap} (<a href="{href}">full size</a>)</figcaption></figure>')


def _figures(items: list[str]) -> str:
    return f'<div class="figs">{"".join(items)}</div>' if items else ""


# ---------------------------------------------------------------------------- tables


def _td(text: str, cls: str = "") -> str:
    return f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>"


def _pivot_table(p: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    """A variant x schedule pivot: the best cell marked, a dagger on cells with a degenerate trial and
    a note linking to those trials; with ``baseline`` (the pivot of the random-map score) its value
    under each cell."""
    best = set(best_cells(p))
    head = "".join(f"<th>{html.escape(s)}</th>" for s in p["schedules"])
    body = []
    for v in p["variants"]:
        tds = []
        for s in p["schedules"]:
            key = f"{v}|{s}"
            c = p["cells"][key]
            text = html.escape(cell_text(c, metric=p["metric"]))
            base = baseline["cells"][key] if baseline else None
            if base and base["mean"] is not None:
                random = cell_text(base, metric=baseline["metric"], mark="")
                text += f'<span class="base">{BASELINE_NAMES[baseline["metric"]]} {html.escape(random)}</span>'
            tds.append(_td(text, "best" if key in best else "muted" if c["mean"] is None else ""))
        body.append(f"<tr><td>{html.escape(v)}</td>{''.join(tds)}</tr>")
    why = p.get("degenerate") or {}
    foot = (f'<p class="foot">{DAGGER} includes a degenerate trial: {", ".join(_trial_link(t) for t in why)} (why: '
            "in the trials table and in each trial's section)</p>" if why else "")
    return f"<table><tr><th>variant</th>{head}</tr>{''.join(body)}</table>{foot}"


def _compare_tables(c: dict[str, Any]) -> str:
    """`results --compare` of test accuracy as HTML: the rule under a heading, a table per kind, the
    seeds that would decide the rest."""
    from .compare import HEAD, footer, header, table_rows

    parts = [f'<p class="muted">{html.escape(header(c))}</p>']
    for kind, ref in (("variant", c["ref_variant"]), ("schedule", c["ref_schedule"])):
        body = table_rows(c, kind)
        if not body:
            continue
        within = "schedule" if kind == "variant" else "variant"
        head = "".join(f"<th>{html.escape(h)}</th>" for h in HEAD[kind])
        trs = "".join("<tr>" + "".join(_td(html.escape(x), "text" if i in (0, 1, 8) else "") for i, x in enumerate(r))
                      + "</tr>" for r in body)
        parts.append(f"<h4>Within each {within}, every {kind} against {html.escape(ref)}</h4>"
                     f'<div class="wide"><table>{head and f"<tr>{head}</tr>"}{trs}</table></div>')
    parts += [f'<p class="foot">{html.escape(line)}</p>' for line in footer(c)]
    return "".join(parts)


def _trial_link(tid: str) -> str:
    return f'<a href="#t-{html.escape(quote(tid))}">{html.escape(tid)}</a>'


TEXT_COLUMNS = ("trial_id", "variant", "lr_schedule", "status", "degenerate", "note")


def _rows_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f'<th class="text">{html.escape(c)}</th>' if c in TEXT_COLUMNS else f"<th>{html.escape(c)}</th>"
                   for c in columns)
    body = []
    for r in rows:
        cells = [_trial_link(r["trial_id"]) if c == "trial_id" else html.escape(fmt_value(r.get(c), c))
                 for c in columns]
        tds = "".join(_td(x, "text" if c in TEXT_COLUMNS else "") for c, x in zip(columns, cells))
        body.append(f'<tr{" class=degenerate" if r.get("degenerate") else ""}>{tds}</tr>')
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _has(rows: list[dict[str, Any]], metric: str) -> bool:
    return any(isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric]) for r in rows)


def _pm(r: dict[str, Any], key: str, spread: str | None) -> str:
    """A value with its spread (standard error or std) where the row has one: 0.7000 ± 0.0200; a count
    with what it counts of (``spread`` "of:KEY"): 80 of 150."""
    text = fmt_value(r.get(key), key)
    if spread and spread.startswith("of:"):
        whole = fmt_value(r.get(spread[3:]), spread[3:])
        return f"{text} of {whole}" if text and whole else text
    err = fmt_value(r.get(spread), spread) if spread else ""
    return f"{text} ± {err}" if text and err else text


# The interpretation table: groups of columns under a heading, each (heading, row key, its spread's key).
INTERPRET_TABLE = [
    ("calibration and clusters", [("ECE", "ece", None), ("ARI", "ari", None), ("NMI", "nmi", None),
                                  ("purity", "purity", None)]),
    ("deletion AUC ± SE (lower is better)", [("map", "deletion_auc", "deletion_auc_se"),
                                             ("random map", "deletion_auc_random", "deletion_auc_random_se"),
                                             ("map − random ± paired SE", "deletion_vs_random",
                                              "deletion_vs_random_se"),
                                             ("images won", "deletion_wins", None),
                                             ("verdict", "deletion_verdict", None)]),
    ("insertion AUC ± SE (higher is better)", [("map", "insertion_auc", "insertion_auc_se"),
                                               ("random map", "insertion_auc_random", "insertion_auc_random_se"),
                                               ("map − random ± paired SE", "insertion_vs_random",
                                                "insertion_vs_random_se"),
                                               ("images won", "insertion_wins", None),
                                               ("verdict", "insertion_verdict", None)]),
    ("faithfulness", [("images", "faithfulness_n_images", None)]),
    ("randomization check, every layer randomized (mean ± std)", [
        ("Spearman ρ", "sanity_rho", "sanity_rho_std"), ("its floor", "sanity_floor", "sanity_floor_std"),
        ("ABS ρ", "sanity_abs_rank_rho", "sanity_abs_rank_rho_std"),
        ("its floor", "sanity_abs_floor", "sanity_abs_floor_std"), ("draws", "sanity_n_draws", None),
        ("images", "sanity_n_images", None), ("degenerate map pairs", "sanity_n_degenerate", "of:sanity_n_pairs")]),
]


def _interpretation_table(rows: list[dict[str, Any]]) -> str:
    """One row per interpreted trial: the scores, each faithfulness AUC beside its random-map baseline
    with standard errors, the randomization check's correlations with their spread and counts.
    Columns no trial has a value for are left out."""
    groups = [(g, [c for c in cols if any(_pm(r, c[1], None) for r in rows)]) for g, cols in INTERPRET_TABLE]
    groups = [(g, cols) for g, cols in groups if cols]
    if not groups:
        return ""
    top = "".join(f'<th colspan="{len(cols)}">{html.escape(g)}</th>' for g, cols in groups)
    sub = "".join(f"<th>{html.escape(h)}</th>" for _, cols in groups for h, _, _ in cols)
    checked = any(r.get("degenerate") is not None for r in rows)  # older metrics.json files have no flag
    body = []
    for r in rows:
        tds = "".join(_td(html.escape(_pm(r, key, spread))) for _, cols in groups for _, key, spread in cols)
        flag = f'<td class="text">{html.escape(fmt_value(r.get("degenerate"), "degenerate"))}</td>' if checked else ""
        body.append(f'<tr{" class=degenerate" if r.get("degenerate") else ""}><td>{_trial_link(r["trial_id"])}</td>'
                    f"{flag}{tds}</tr>")
    flag = '<th rowspan="2">degenerate</th>' if checked else ""
    return (f'<div class="wide"><table class="interp"><tr><th rowspan="2">trial</th>{flag}{top}</tr><tr>{sub}</tr>'
            f'{"".join(body)}</table></div>')


# ---------------------------------------------------------------------------- provenance


def _attempts(trial_dir: Path) -> list[dict[str, Any]]:
    """A trial's attempts (one per attempt to train it); none where attempts.jsonl is damaged (the trials
    table's note says so)."""
    try:
        return trial_folder.read_attempts(trial_dir)
    except trial_folder.Damaged:
        return []


def _dump_attrs(trial_dir: Path) -> dict[str, Any]:
    """The provenance attributes of a trial's features.h5 (versions, git commit, config, precision,
    created), without reading its arrays; {} where there is none (a pulled copy, a failed trial)."""
    path = trial_dir / "features.h5"
    if not path.is_file():
        return {}
    try:
        return read_provenance(path)
    except OSError:
        return {}


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t)) if t else ""


def _counted(values: list[str], empty: str = "not recorded") -> str:
    """Distinct values, each with how many trials had it where they differ: 'a (3 trials), b (1 trial)'."""
    counts = Counter(v for v in values if v)
    if not counts:
        return empty
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{v} ({n} trial{'s' * (n != 1)})" for v, n in counts.most_common())


def _slurm_jobs(sweep_dir: Path) -> list[str]:
    """'ROLE ID' of every job recorded as submitted for the sweep; the one line where the record is damaged."""
    try:
        return [f"{j['role']} {j['job_id']}" for sub in trial_folder.read_jobs(sweep_dir) for j in sub["jobs"]]
    except trial_folder.Damaged as e:
        return [f"not read: {e}"]


def _spec_data(sweep_dir: Path) -> dict[str, Any]:
    import yaml

    try:
        spec = yaml.safe_load((sweep_dir / "spec.yaml").read_text()) if (sweep_dir / "spec.yaml").is_file() else {}
    except yaml.YAMLError:
        return {}
    return (spec.get("data") or {}) if isinstance(spec, dict) else {}


def trial_provenance(trial_dir: Path) -> dict[str, Any]:
    """Where and how one trial ran: its attempts, the dump's attributes, the interpretation's device."""
    attempts = _attempts(trial_dir)
    attrs = _dump_attrs(trial_dir)
    result = trial_dir / trial_folder.RESULT
    try:
        interp = read_interpretation(trial_dir)
    except trial_folder.Damaged:
        interp = None
    cfg = attrs.get("config") or {}
    if not cfg:
        try:
            cfg = trial_folder.read_config(trial_dir) or {}
        except trial_folder.Damaged:
            cfg = {}
    return {
        "attempts": attempts, "versions": attrs.get("versions") or {}, "git_commit": attrs.get("git_commit", ""),
        "device": cfg.get("device", ""), "precision": cfg.get("precision", ""),
        "dump_precision": attrs.get("precision", ""),
        "start": min((a["time"] for a in attempts if isinstance(a.get("time"), (int, float))), default=None),
        "end": result.stat().st_mtime if result.is_file() else None,
        "interpreted_on": (interp or {}).get("device", ""),
    }


def _attempts_text(attempts: list[dict[str, Any]]) -> str:
    if not attempts:
        return "no attempts recorded"
    hosts = ", ".join(dict.fromkeys(str(a.get("host", "?")) for a in attempts))
    text = f"{len(attempts)} attempt{'s' * (len(attempts) != 1)} on {hosts}"
    if len(attempts) > 1:
        text += " (from epochs " + ", ".join(str(int(a.get("start_epoch", 0)) + 1) for a in attempts) + ")"
    jobs = list(dict.fromkeys(str(a["slurm_job_id"]) for a in attempts if a.get("slurm_job_id")))
    return text + (f", SLURM job{'s' * (len(jobs) != 1)} {', '.join(jobs)}" if jobs else "")


def _provenance(sweep_dir: Path, rows: list[dict[str, Any]], prov: dict[str, dict[str, Any]]) -> str:
    """The provenance block: code and packages, device and precision, hosts, SLURM jobs and attempts,
    the data's fingerprint, when it ran."""
    ps = [p for p in prov.values() if p["attempts"] or p["versions"]]  # trials that ran
    versions = [", ".join(f"{k} {v}" for k, v in sorted(p["versions"].items())) for p in ps]
    commits = [p["git_commit"][:12] for p in ps]
    attempts = [a for p in ps for a in p["attempts"]]
    again = {t: len(p["attempts"]) for t, p in prov.items() if len(p["attempts"]) > 1}
    dumped = [p["dump_precision"] for p in ps if p["dump_precision"]]
    interpreted = [p["interpreted_on"] for p in ps if p["interpreted_on"]]
    cuda = sorted({str(a["cuda_visible_devices"]) for a in attempts if a.get("cuda_visible_devices")})
    data = _spec_data(sweep_dir)
    sizes = "/".join(str(data.get(k, "all")) for k in ("train_size", "valid_size", "test_size"))
    starts = [p["start"] for p in ps if p["start"]]
    ends = [p["end"] for p in ps if p["end"]]
    statuses = Counter(r["status"] for r in rows)
    items = [
        ("trials", f"{len(rows)}: " + ", ".join(f"{n} {s}" for s, n in statuses.most_common())),
        ("code", f"git commit {_counted(commits)}"),
        ("packages", _counted(versions)),
        ("device, precision", "; ".join(x for x in (
            f"device {_counted([p['device'] for p in ps])}, precision {_counted([p['precision'] for p in ps])} "
            "(as configured)",
            "trained on " + _counted([str(a["device"]) + (f" ({a['gpu']})" if a.get("gpu") else "")
                                      + f", autocast {a.get('autocast')}" for a in attempts if a.get("device")])
            if any(a.get("device") for a in attempts) else "",
            f"test-set features computed in {_counted(dumped)}" if dumped else "",
            f"CUDA_VISIBLE_DEVICES {', '.join(cuda) or 'not set'}",
            f"interpreted on {_counted(interpreted)}" if interpreted else "") if x)),
        ("hosts", _counted([str(a.get("host")) for a in attempts if a.get("host")])
         + ("; nodes " + _counted([str(a.get("node")) for a in attempts if a.get("node")])
            if any(a.get("node") for a in attempts) else "")),
        ("attempts", f"{len(attempts)} attempts to train {len(prov)} trials; "
                     + ("retried or requeued: " + ", ".join(f"{t} ({n} attempts)" for t, n in again.items())
                        if again else "none retried or requeued")),
    ]
    jobs = _slurm_jobs(sweep_dir)
    ran = sorted({str(a["slurm_job_id"]) for a in attempts if a.get("slurm_job_id")})
    if jobs or ran:
        items.append(("SLURM", "; ".join(x for x in (("submitted: " + ", ".join(jobs)) if jobs else "",
                                                       ("trials ran in jobs " + ", ".join(ran)) if ran else "") if x)))
    items += [
        ("data", f"content sha256 {data.get('content_sha256') or 'not recorded'}; source {data.get('source') or '?'}, "
                 f"split seed {data.get('split_seed', '?')}, train/valid/test {sizes}" if data
         else "not recorded (no spec.yaml)"),
        ("ran", f"first attempt {_when(min(starts)) if starts else '?'}, last result "
                f"{_when(max(ends)) if ends else '?'}, report {_when(time.time())}"),
    ]
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in items)
    return f'<table class="kv">{body}</table>'


# ---------------------------------------------------------------------------- trials


def _banner(m: dict[str, Any]) -> str:
    """Why a trial is degenerate and which analyses were skipped, and why ("" where neither)."""
    deg, skipped = m["degenerate"], m["skipped"]
    parts = []
    if deg["detected"]:
        reasons = "".join(f"<li>{html.escape(r)}</li>" for r in deg["reasons"]) or "<li>no reason recorded</li>"
        parts.append(f"<strong>Degenerate trial.</strong><ul>{reasons}</ul>")
    if skipped:
        items = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in skipped.items())
        parts.append(f"Skipped analyses:<ul>{items}</ul>")
    return f'<div class="banner">{"".join(parts)}</div>' if parts else ""


def shown(fig: str, skipped: dict[str, str]) -> bool:
    """Whether a figure (a TRIAL_FIGURES name, or a sweep grid for a trial) belongs to no skipped analysis."""
    return not any(k == fig or k in FIGURE_ANALYSES.get(fig, ()) for k in skipped)


def _trial_section(sweep_dir: Path, r: dict[str, Any], p: dict[str, Any]) -> str:
    tid = r["trial_id"]
    out = sweep_dir / "trials" / tid / "interpret"
    facts = (f"{r['status']}, {fmt_value(r['epochs'], 'epochs')} epochs, test accuracy "
             f"{fmt_value(r['test_acc']) or 'n/a'}" + (f" ({r['note']})" if r.get("note") and not r.get("degenerate")
                                                        else ""))  # the banner says why it is degenerate
    ran = _attempts_text(p["attempts"])
    if p["start"] and p["end"]:
        ran += f", {_when(p['start'])} to {_when(p['end'])}"
    if p["git_commit"]:
        ran += f", git {p['git_commit'][:12]}"
    parts = [f'<h3 id="t-{html.escape(quote(tid))}">{html.escape(tid)}</h3>',
             f'<p class="muted">{html.escape(facts)}<br>{html.escape(ran)}</p>']
    damaged = ""
    try:
        m = read_interpretation(sweep_dir / "trials" / tid)
    except trial_folder.Damaged as e:
        m, damaged = None, str(e)
    if m is None:
        why = "interpretation failed (see interpret/error.txt)" if r.get("interpretation") == "failed" else \
            f"interpretation damaged: {damaged}" if r.get("interpretation") == "damaged" else \
            "not interpreted (only completed trials are)"
        return "".join(parts) + f'<p class="muted">{why}</p>'
    parts.append(_banner(m))
    parts.append(_figures([_figure(sweep_dir, out / f"{fig}.png", caption) for fig, caption in TRIAL_FIGURES.items()
                           if (out / f"{fig}.png").is_file() and shown(fig, m["skipped"])]))
    return "".join(parts)


# ---------------------------------------------------------------------------- the page


def _references(sweep_dir: Path) -> dict[str, str | None]:
    ref = spec_reference(sweep_dir)
    return {"ref_variant": ref.get("variant"), "ref_schedule": ref.get("schedule")}


def build_html(sweep_dir: Path) -> str:
    """The report of a sweep folder as one HTML string."""
    rows = ordered(collect_rows(sweep_dir))
    name = sweep_dir.name
    accuracy = pivot(rows)
    variants = accuracy["variants"]
    prov = {r["trial_id"]: trial_provenance(sweep_dir / "trials" / r["trial_id"]) for r in rows}
    interpreted = [r for r in rows if (sweep_dir / "trials" / r["trial_id"] / "interpret" / "metrics.json").is_file()]
    degenerate = [r["trial_id"] for r in rows if r.get("degenerate")]
    table = _interpretation_table(interpreted)
    pivots = [(metric, title) for metric, title in METRICS.items() if _has(rows, metric)]
    sections = [("results", "Results"), ("compare", "Differences")] + ([("pivots", "Pivots")] if pivots else []) + \
        ([("interpretation", "Interpretation")] if table else []) + \
        [("provenance", "Provenance"), ("figures", "Figures")] + [(f"v-{quote(v)}", v) for v in variants]
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(name)}: "
             f"vgg-xai report</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(name)}</h1><p class=\"muted\">{len(rows)} trials, {len(interpreted)} interpreted"
             + (f", {len(degenerate)} degenerate ({html.escape(', '.join(degenerate))})" if degenerate else "")
             + f"; written {html.escape(_when(time.time()))}. Every figure is a thumbnail: click it for the full "
               "PNG.</p>",
             "<nav>" + "".join(f'<a href="#{html.escape(a)}">{html.escape(t)}</a>' for a, t in sections) + "</nav>",
             '<h2 id="results">Results</h2><h3>Test accuracy</h3>', _pivot_table(accuracy)]
    # What a reader looks at first: the accuracy, its chart and curves, the trials; the rest below.
    parts.append(_figures([_figure(sweep_dir, sweep_dir / "figures" / f"{fig}.png", SWEEP_FIGURES[fig],
                                   SWEEP_THUMB_SCALE)
                           for fig in FIRST_FIGURES if (sweep_dir / "figures" / f"{fig}.png").is_file()]))
    columns = [c for c in ("trial_id", "variant", "lr_schedule", "seed", "status", "degenerate", "epochs",
                           "best_valid_acc", "best_epoch", "test_acc", "wall_s", "note")
               if c not in ("degenerate", "note") or any(r.get(c) is not None and r.get(c) != "" for r in rows)]
    parts += ["<h3>Trials</h3>", _rows_table(rows, columns)]
    if rows:
        parts += ['<h3 id="compare">Which differences are real</h3>',
                  _compare_tables(compare(rows, "test_acc", **_references(sweep_dir)))]
    if pivots:
        parts.append('<h2 id="pivots">Pivots of the other metrics</h2>')
    for metric, title in pivots:
        base = pivot(rows, BASELINES[metric]) if metric in BASELINES and _has(rows, BASELINES[metric]) else None
        parts += [f"<h3>{html.escape(title)}</h3>", _pivot_table(pivot(rows, metric), base)]
    if table:
        parts += ['<h2 id="interpretation">Interpretation</h2>',
                  "<p class=\"muted\">Per trial: each faithfulness score beside the same score of a random map "
                  "(± standard error over its images, and how many), and the map against the random map on the "
                  "same image: the mean difference with its paired standard error, the share of images where the "
                  "map is the better one, and a verdict (it beats the random map where the difference goes the "
                  "better way with a paired t-test p below 0.05). The randomization check's correlations with the "
                  "trained model's maps once every layer is re-initialized (± std over the draws of random weights "
                  "and the images), of the rectified maps and of the absolute unrectified maps (ABS, Adebayo et "
                  "al.), each beside its noise floor: the same correlation between the trained maps of different "
                  "images. A method passes where its correlation falls to the floor.</p>",
                  f'<p class="muted">Images: {html.escape(IMAGES_RULE)}.</p>', table]
    parts += ['<h2 id="provenance">Provenance</h2>', _provenance(sweep_dir, rows, prov)]

    parts.append('<h2 id="figures">Figures</h2>')
    parts.append(_figures([_figure(sweep_dir, sweep_dir / "figures" / f"{fig}.png", caption, SWEEP_THUMB_SCALE)
                           for fig, caption in SWEEP_FIGURES.items()
                           if fig not in FIRST_FIGURES and (sweep_dir / "figures" / f"{fig}.png").is_file()]))
    for v in variants:
        parts.append(f'<h2 id="v-{html.escape(quote(v))}">Variant {html.escape(v)}</h2>')
        parts += [_trial_section(sweep_dir, r, prov[r["trial_id"]]) for r in rows if r["variant"] == v]
    spec = sweep_dir / "spec.yaml"
    if spec.is_file():
        parts += ['<h2>Job spec</h2><p class="muted"><a href="spec.yaml">spec.yaml</a></p>',
                  f"<pre>{html.escape(spec.read_text())}</pre>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(sweep_dir: str | Path) -> Path:
    """Write ``<sweep>/report.html`` atomically; returns its path."""
    path = Path(sweep_dir) / "report.html"
    atomic_write_text(path, build_html(Path(sweep_dir)))
    return path
