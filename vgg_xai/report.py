"""report.html: one self-contained page per sweep (tables and every figure inline, no network,
no scripts), a section per variant."""

from __future__ import annotations

import base64
import html
import math
import time
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text
from .results import cell_text, collect_rows, fmt_value, pivot

SWEEP_FIGURES = {
    "accuracy": "Test accuracy by variant and schedule (mean and std over seeds)",
    "valid_curves": "Validation accuracy of every trial, by variant",
    "cam_grid": "Class activation maps of the probe images, every trial",
    "tsne_grid": "t-SNE of the test-set feature vectors, every trial",
}
TRIAL_FIGURES = {
    "curves": "Loss and accuracy",
    "confusion": "Confusion matrix, per-class accuracy, calibration",
    "cam": "Class activation maps",
    "faithfulness": "CAM faithfulness: deletion and insertion",
    "sanity": "Model-randomization check (cascading, from the top)",
    "tsne_gmm": "t-SNE by label and by GMM cluster",
    "bic": "BIC scan of Gaussian mixtures",
    "contingency": "GMM cluster x class",
    "filters_first": "First conv layer: filters, untrained and trained",
    "fmaps_first": "First conv layer: feature maps",
    "filters_last": "Last conv layer: filters, untrained and trained",
    "fmaps_last": "Last conv layer: feature maps",
    "through_layers": "One probe image through every conv layer",
    "bn_histograms": "Activations before and after each BatchNorm",
}
METRICS = {  # pivots shown besides test accuracy, when any trial has the value
    "best_valid_acc": "best validation accuracy", "ece": "expected calibration error (lower is better)",
    "ari": "GMM clusters vs labels: adjusted Rand index", "nmi": "GMM clusters vs labels: normalized mutual information",
    "deletion_auc": "CAM deletion AUC (lower is better)", "insertion_auc": "CAM insertion AUC (higher is better)",
    "sanity_rho": "Spearman correlation of the CAM after randomizing every layer (near 0 is good)",
}
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em} td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
figure{display:inline-block;vertical-align:top;margin:.5em;max-width:100%} figure img{max-width:100%;height:auto}
figcaption{font-size:.85em;color:#555} .muted{color:#777} pre{background:#f7f7f7;padding:.6em;overflow:auto}
nav a{margin-right:1em}
"""


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


MUTED_TD = '<td class="muted">'


def _pivot_table(p: dict[str, Any]) -> str:
    head = "".join(f"<th>{html.escape(s)}</th>" for s in p["schedules"])
    body = []
    for v in p["variants"]:
        cells = [p["cells"][f"{v}|{s}"] for s in p["schedules"]]
        tds = "".join((MUTED_TD if c["mean"] is None else "<td>") + html.escape(cell_text(c, metric=p["metric"]))
                      + "</td>" for c in cells)
        body.append(f"<tr><td>{html.escape(v)}</td>{tds}</tr>")
    return f"<table><tr><th>variant</th>{head}</tr>{''.join(body)}</table>"


def _rows_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt_value(r.get(c, ''), c))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _has(rows: list[dict[str, Any]], metric: str) -> bool:
    return any(isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric]) for r in rows)


def build_html(sweep_dir: Path) -> str:
    """The report of a sweep folder as one HTML string."""
    rows = collect_rows(sweep_dir)
    name = sweep_dir.name
    accuracy = pivot(rows)
    variants = accuracy["variants"]
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(name)}: "
             f"vgg-xai report</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(name)}</h1><p class=\"muted\">{len(rows)} trials; written "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
             "<nav>" + "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in
                               [("results", "Results"), ("figures", "Figures")]
                               + [(f"v-{v}", v) for v in variants]) + "</nav>",
             '<h2 id="results">Results</h2><h3>Test accuracy</h3>', _pivot_table(accuracy)]
    for metric, title in METRICS.items():
        if _has(rows, metric):
            parts += [f"<h3>{html.escape(title)}</h3>", _pivot_table(pivot(rows, metric))]
    columns = [c for c in ("trial_id", "status", "note", "epochs", "best_valid_acc", "test_acc", "ece", "ari", "nmi",
                           "purity", "deletion_auc", "insertion_auc", "sanity_rho", "wall_s")
               if c in ("trial_id", "status", "epochs") or _has(rows, c) or (c == "note" and any(r["note"] for r in rows))]
    parts += ["<h3>Trials</h3>", _rows_table(rows, columns)]

    parts.append('<h2 id="figures">Figures</h2>')
    for fig, caption in SWEEP_FIGURES.items():
        path = sweep_dir / "figures" / f"{fig}.png"
        if path.is_file():
            parts.append(_img(path, caption))

    for v in variants:
        parts.append(f'<h2 id="v-{html.escape(v)}">Variant {html.escape(v)}</h2>')
        for r in (r for r in rows if r["variant"] == v):
            out = sweep_dir / "trials" / r["trial_id"] / "interpret"
            facts = f"{r['status']}, {r['epochs']} epochs, test accuracy {fmt_value(r['test_acc']) or 'n/a'}" + \
                (f" ({r['note']})" if r.get("note") else "")
            parts.append(f"<h3>{html.escape(r['trial_id'])}</h3><p class=\"muted\">{html.escape(facts)}</p>")
            if not (out / "metrics.json").is_file():
                why = "interpretation failed (see interpret/error.txt)" if (out / "error.txt").is_file() else \
                    "not interpreted (only completed trials are)"
                parts.append(f'<p class="muted">{why}</p>')
                continue
            for fig, caption in TRIAL_FIGURES.items():
                if (out / f"{fig}.png").is_file():
                    parts.append(_img(out / f"{fig}.png", caption))
    spec = sweep_dir / "spec.yaml"
    if spec.is_file():
        parts += ["<h2>Job spec</h2>", f"<pre>{html.escape(spec.read_text())}</pre>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(sweep_dir: str | Path) -> Path:
    """Write ``<sweep>/report.html`` atomically; returns its path."""
    path = Path(sweep_dir) / "report.html"
    atomic_write_text(path, build_html(Path(sweep_dir)))
    return path
