"""Post-processing of real trial folders: the interpretation suite per trial, the sweep's tables,
figures and report.html (rendered in headless Chromium), idempotence and two runs at once."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ray_processes
from vgg_xai.config import TrialConfig
from vgg_xai.interpret_arrays import read_arrays
from vgg_xai.postprocess import Settings, postprocess
from vgg_xai.report import TRIAL_FIGURES, shown
from vgg_xai.train import run_trial


# Small enough for the tiny data set (100 test images): fewer PCA dimensions and BIC candidates.
SMALL = Settings(pca_dim=10, bic_ks=(2, 5, 10), bic_types=("full", "diag"), perplexity=10)
TRIALS = {"plain-lr1e-3-s0": dict(variant="plain", head="mlp"),
          "bn-lr1e-3-s0": dict(variant="bn", head="linear")}


@pytest.fixture(scope="module")
def trained_sweep(tmp_path_factory, tiny_cache) -> Path:
    """A sweep folder with two trained trials (one epoch each) and one that never started."""
    root = tmp_path_factory.mktemp("sweep") / "tiny"
    for tid, over in TRIALS.items():
        cfg = TrialConfig(data=str(tiny_cache), width=0.125, epochs=1, batch_size=32, precision="fp32",
                          device="cpu", **over)
        run_trial(cfg, root / "trials" / tid)
    pending = root / "trials" / "l2-lr1e-3-s0"
    pending.mkdir(parents=True)
    pending.joinpath("config.json").write_text(TrialConfig(data=str(tiny_cache), variant="l2").to_json())
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _mtimes(sweep: Path) -> dict[str, int]:
    return {str(p.relative_to(sweep)): p.stat().st_mtime_ns for p in sweep.glob("trials/*/interpret/*")
            if not p.name.startswith(".")}


@pytest.mark.slow
def test_every_completed_trial_is_interpreted(trained_sweep, tmp_path):
    sweep = _copy(trained_sweep, tmp_path / "tiny")
    s = postprocess(sweep, SMALL, workers=1)
    assert sorted(s.done) == sorted(TRIALS) and not s.failed and not s.skipped
    assert not (sweep / "trials" / "l2-lr1e-3-s0" / "interpret").exists()  # never trained: nothing to read

    probes = []
    for tid, over in TRIALS.items():
        out = sweep / "trials" / tid / "interpret"
        m = json.loads((out / "metrics.json").read_text())
        a = read_arrays(out / "arrays.h5")
        result = json.loads((sweep / "trials" / tid / "result.json").read_text())
        assert m["summary"]["test_acc"] == pytest.approx(result["test_acc"])  # from features.h5
        # An analysis that a barely trained trial makes meaningless (mostly all-zero maps) is skipped
        # with a reason: its values are null and its figures are not drawn.
        skipped = m["skipped"]
        for k, analysis in (("ece", None), ("ari", "gmm"), ("nmi", "gmm"), ("purity", "gmm"),
                            ("deletion_auc", "faithfulness"), ("insertion_auc", "faithfulness"), ("sanity_rho", "sanity")):
            if analysis in skipped:
                assert m["summary"][k] is None and skipped[analysis], k
            else:
                assert (-1 if k == "sanity_rho" else 0) <= m["summary"][k] <= 1, k
        # probes: one per class, airplanes (class 0) included, the first probe is an airplane
        labels = a["probes"]["labels"]
        assert sorted(labels.tolist()) == list(range(10)) and labels[0] == 0
        probes.append(a["probes"]["indices"])
        methods = a["cam"]["methods"]
        assert ("cam" in methods) == (over["head"] == "linear")  # plain CAM only for the linear head
        for meth in methods:
            maps = a["cam"][meth]
            assert maps.shape == (10, 32, 32) and maps.min() >= 0 and maps.max() <= 1
        # untrained and trained first-layer filters differ; the init checkpoint was used
        assert not np.allclose(a["filters"]["init"]["first"], a["filters"]["trained"]["first"])
        assert a["filters"]["trained"]["first"].shape[1:] == (3, 3, 3)  # raw conv1 weights (out, 3, 3, 3)
        assert "tsne" in skipped or a["embedding"]["tsne"].shape == (len(a["embedding"]["labels"]), 2)
        assert a["metrics"]["confusion"].sum() == len(a["embedding"]["labels"])
        assert ("bn" in a) == (over["variant"] == "bn")
        pngs = {p.stem for p in out.glob("*.png")}
        expected = {f for f in TRIAL_FIGURES if shown(f, skipped)} - (set() if over["variant"] == "bn" else {"bn_histograms"})
        assert pngs == expected
        for p in out.glob("*.png"):
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(probes[0], probes[1])  # the same probe images for every trial

    for fig in ("accuracy", "valid_curves", "cam_grid", "tsne_grid"):
        assert (sweep / "figures" / f"{fig}.png").is_file(), fig
    rows = json.loads((sweep / "tables" / "accuracy.json").read_text())["rows"]
    assert {r["trial_id"] for r in rows} == set(TRIALS) | {"l2-lr1e-3-s0"}
    html = (sweep / "report.html").read_text()
    assert html.count("<img ") == 4 + sum(len(list((sweep / "trials" / t / "interpret").glob("*.png"))) for t in TRIALS)
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:|/)""", html)  # no network, no absolute path
    # Every figure: a small inline thumbnail that links to its full PNG, by a path relative to the folder.
    pngs = {str(p.relative_to(sweep)) for p in sweep.glob("figures/*.png")} | \
        {str(p.relative_to(sweep)) for p in sweep.glob("trials/*/interpret/*.png")}
    assert {h for h in _links(html) if h.endswith(".png")} == pngs
    assert all(src.startswith("data:image/") for src in re.findall(r'<img src="([^"]*)"', html))


@pytest.mark.slow
def test_rerun_skips_up_to_date_trials_and_redoes_retrained_ones(trained_sweep, tmp_path):
    sweep = _copy(trained_sweep, tmp_path / "tiny")
    postprocess(sweep, SMALL, workers=1)
    before = _mtimes(sweep)
    s = postprocess(sweep, SMALL, workers=1)
    assert s.done == [] and sorted(s.skipped) == sorted(TRIALS)
    assert _mtimes(sweep) == before

    # A newer checkpoint (the trial was trained further) makes that trial, and only it, stale.
    ckpt = sweep / "trials" / "bn-lr1e-3-s0" / "checkpoint.pt"
    later = time.time() + 5
    os.utime(ckpt, (later, later))
    s = postprocess(sweep, SMALL, workers=1)
    assert s.done == ["bn-lr1e-3-s0"] and s.skipped == ["plain-lr1e-3-s0"]
    # Other settings are not up to date either.
    s = postprocess(sweep, Settings(**{**SMALL.__dict__, "probes_per_class": 2}), workers=1)
    assert sorted(s.done) == sorted(TRIALS)
    a = read_arrays(sweep / "trials" / "bn-lr1e-3-s0" / "interpret" / "arrays.h5")
    assert len(a["probes"]["indices"]) == 20


@pytest.mark.slow
def test_a_broken_trial_is_reported_and_the_others_finish(trained_sweep, tmp_path):
    sweep = _copy(trained_sweep, tmp_path / "tiny")
    (sweep / "trials" / "plain-lr1e-3-s0" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    s = postprocess(sweep, SMALL, workers=1)
    assert list(s.failed) == ["plain-lr1e-3-s0"] and s.done == ["bn-lr1e-3-s0"]
    assert (sweep / "trials" / "plain-lr1e-3-s0" / "interpret" / "error.txt").is_file()
    assert not (sweep / "trials" / "plain-lr1e-3-s0" / "interpret" / "metrics.json").exists()
    assert "interpretation failed" in (sweep / "report.html").read_text()


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vgg_xai.cli", "postprocess", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_runs_at_once_interpret_each_trial_once(trained_sweep, tmp_path):
    """One run on Ray tasks (two workers), one in-process, started together: both succeed, each
    trial is computed by exactly one of them, and every file reads back whole."""
    sweep = _copy(trained_sweep, tmp_path / "tiny")
    runs = [_cli(str(sweep), "--workers", "2"), _cli(str(sweep), "--workers", "1")]
    outs = [p.communicate(timeout=600)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outs
    done = [int(re.search(r"interpreted (\d+) trials", o).group(1)) for o in outs]
    assert sum(done) == len(TRIALS), outs
    # In a log (no terminal), one line a trial says which run computed it and which found it done.
    lines = [line for o in outs for line in o.splitlines() if line.startswith("interpret ")]
    assert sorted(line.split(":")[0] for line in lines if "interpreted in" in line) == \
        sorted(f"interpret {t}" for t in TRIALS), outs
    for tid in TRIALS:
        out = sweep / "trials" / tid / "interpret"
        json.loads((out / "metrics.json").read_text())
        read_arrays(out / "arrays.h5")
        assert not list(out.glob(".*.tmp*"))  # no temporary file left
    assert "<html" in (sweep / "report.html").read_text()
    assert ray_processes() == []


def _links(page: str) -> list[str]:
    """The page's links to files (not to its own anchors), as paths relative to its folder."""
    from urllib.parse import unquote

    return [unquote(h.replace("&amp;", "&")) for h in re.findall(r'<a href="([^"#][^"]*)"', page)]


def report_budget(trials: int) -> int:
    """What report.html may weigh for a sweep of this many trials: the issue's 'at most about 5 MB' for
    the 15-trial smoke study (measured: about 3 MB), scaled to the trial count."""
    return 150_000 + 330_000 * trials


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Checks injected into a copy of the report: errors of any kind (a resource that fails to load,
# a script error, console.error) and images that did not decode.
PROBE_HEAD = ("<script>window.__errs=[];addEventListener('error',e=>__errs.push(String(e.message||e.target.src)),true);"
              "const ce=console.error;console.error=(...a)=>{__errs.push(a.join(' '));ce(...a)};</script>")
# After the page loads: how many images it has and how many did not decode, then every link to a PNG
# loaded as an image (relative to the page's folder): how many, which failed. Written on <body>.
PROBE_BODY = ("<script>addEventListener('load',()=>{const im=[...document.images];const b=document.body.dataset;"
              "b.images=im.length;b.broken=im.filter(i=>!i.complete||i.naturalWidth===0).length;"
              "const hrefs=[...new Set([...document.querySelectorAll('a[href$=\".png\"]')].map(a=>a.href))];"
              "Promise.all(hrefs.map(h=>new Promise(ok=>{const i=new Image();i.onload=()=>ok(i.naturalWidth?'':h);"
              "i.onerror=()=>ok(h);i.src=h}))).then(r=>{b.links=hrefs.length;"
              "b.badlinks=JSON.stringify(r.filter(x=>x));b.errors=JSON.stringify(__errs)});"
              # the layout in a 1400 px window: how wide the page is (a wide table scrolls in its own box),
              # where the accuracy chart and the pivots of the other metrics begin
              "b.pagewidth=document.documentElement.scrollWidth;b.window=innerWidth;"
              "const top=s=>{const e=document.querySelector(s);return e?Math.round(e.getBoundingClientRect().top):-1};"
              "b.chart=top('img[alt^=\"accuracy\"],a[href$=\"figures/accuracy.png\"] img');b.pivots=top('#pivots')});"
              "</script>")


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-default-apps", "--no-first-run",
             "--no-pings", "--disable-domain-reliability", "--proxy-server=http://127.0.0.1:9",
             f"--user-data-dir={tmp / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=10000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)


def _rendered(tmp: Path, report: Path) -> dict[str, str]:
    """Load a copy of the report, with PROBE_HEAD and PROBE_BODY in it, from the report's own folder in
    headless Chromium; returns the data PROBE_BODY wrote on <body>."""
    page = report.read_text()
    probe = report.with_name("probe.html")
    probe.write_text(page.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_BODY + "</body>", 1))
    dom = _chromium(tmp, "--window-size=1400,900", "--dump-dom", probe.as_uri()).stdout
    probe.unlink()
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    return {k: v.replace("&quot;", '"') for k, v in re.findall(r'data-(\w+)="([^"]*)"', body.group(1))}


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium) to render the report")
def test_report_renders_in_headless_chromium(trained_sweep, tmp_path):
    """The page renders without errors, every thumbnail decodes and every link to a full PNG loads,
    in the sweep folder, in a copy of it elsewhere and in a `results pull` of it; and it is light."""
    from vgg_xai.results import pull

    sweep = _copy(trained_sweep, tmp_path / "tiny")
    postprocess(sweep, SMALL, workers=1)
    report = sweep / "report.html"
    page = report.read_text()
    trials = len(list((sweep / "trials").iterdir()))
    assert report.stat().st_size <= report_budget(trials), (report.stat().st_size, trials)
    links = {h for h in _links(page) if h.endswith(".png")}
    assert len(links) == page.count("<img ") > 10  # one full PNG per thumbnail

    moved = shutil.copytree(sweep, tmp_path / "elsewhere" / "copy")
    shutil.rmtree(sweep)  # nothing may still point at the original folder
    pulled = tmp_path / "pulled" / "tiny"
    pull(str(moved), pulled)
    assert not list(pulled.rglob("*.h5")) and not list(pulled.rglob("*.pt"))
    for folder in (moved, pulled):
        assert all((folder / h).is_file() for h in _links(page)), folder
        attrs = _rendered(tmp_path, folder / "report.html")
        assert int(attrs["images"]) == page.count("<img ") and attrs["broken"] == "0", (folder, attrs)
        assert int(attrs["links"]) == len(links) and json.loads(attrs["badlinks"]) == [], (folder, attrs)
        assert json.loads(attrs["errors"]) == [], (folder, attrs)
        # It fits the window (the interpretation table scrolls in its box), and the accuracy chart comes
        # before the pivots of the other metrics, near the top.
        assert int(attrs["pagewidth"]) <= int(attrs["window"]) == 1400, attrs
        assert 0 < int(attrs["chart"]) < int(attrs["pivots"]) and int(attrs["chart"]) < 2000, attrs

    shot = tmp_path / "report.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,3000", (pulled / "report.html").as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    assert console == []
    print(f"screenshot: {shot}")


REASON = "one predicted class: airplane for 100% of the test images"


def _interpreted_by_hand(trial: Path, figures: tuple[str, ...], **metrics) -> None:
    """What post-processing leaves in a trial's interpret/: PNGs (any figure will do here) and a
    metrics.json with ``metrics`` at its top level."""
    from vgg_xai import viz
    from vgg_xai.figures import read_curves

    out = trial / "interpret"
    for fig in figures:
        viz.save(viz.curves(read_curves(trial)), out / f"{fig}.png")
    summary = {"test_acc": 0.1, "ece": 0.01, "insertion_auc": 0.31, "insertion_auc_se": 0.02,
               "insertion_auc_random": 0.25, "insertion_auc_random_se": 0.03, "faithfulness_n_images": 10}
    (out / "metrics.json").write_text(json.dumps({"schema": "vgg-xai/interpret/1", "trial_id": trial.name,
                                                  "summary": summary, "device": "cpu", **metrics}))


@pytest.mark.slow
def test_report_marks_a_degenerate_trial_and_says_where_the_results_come_from(trained_sweep, tmp_path):
    """Trial folders from run_trial, a metrics.json per trial as post-processing writes it (one
    degenerate, its CAM, faithfulness and t-SNE skipped; one fine), a spec, SLURM's job record and a requeued
    attempt: the report's banner, figures, marks and provenance block say so."""
    from vgg_xai import features
    from vgg_xai.report import write_report
    from vgg_xai.results import write_tables

    sweep = _copy(trained_sweep, tmp_path / "tiny")
    bad, good = "plain-lr1e-3-s0", "bn-lr1e-3-s0"
    figures = ("curves", "cam", "faithfulness", "tsne_gmm")
    _interpreted_by_hand(sweep / "trials" / bad, figures,
                         degenerate={"detected": True, "reasons": [REASON], "checks": {"predicted_classes": 1}},
                         skipped={"cam": "every method's maps of the probe images are degenerate (all zero)",
                                  "faithfulness": "one predicted class: deleting or inserting pixels cannot change it",
                                  "tsne": "collapsed features: no neighbourhoods to embed"})
    _interpreted_by_hand(sweep / "trials" / good, figures, degenerate={"detected": False, "reasons": []}, skipped={})
    digest = "ab" * 32
    (sweep / "spec.yaml").write_text(f"name: tiny\ndata:\n  content_sha256: {digest}\n  source: /data/cifar\n"
                                     "  split_seed: 0\n  test_size: 100\n")
    (sweep / "slurm").mkdir()
    (sweep / "slurm" / "jobs.json").write_text(json.dumps([{"submitted": 1.0, "mode": "ray", "jobs": [
        {"role": "sweep", "job_id": "4242"}, {"role": "postprocess", "job_id": "4243"}]}]))
    attempts = sweep / "trials" / good / "attempts.jsonl"
    first = json.loads(attempts.read_text().splitlines()[0])
    with attempts.open("a") as f:  # requeued on another node, resumed from its checkpoint
        f.write(json.dumps({**first, "host": "gpu07", "start_epoch": 1, "slurm_job_id": "4242"}) + "\n")
    write_tables(sweep)
    page = write_report(sweep).read_text()

    sections = dict(re.findall(r'<h3 id="t-([^"]+)">.*?</h3>(.*?)(?=<h[23]|</body>)', page, re.S))
    assert set(sections) == set(TRIALS) | {"l2-lr1e-3-s0"}
    banner = re.search(r'<div class="banner">(.*?)</div>', sections[bad], re.S).group(1)
    assert "Degenerate trial." in banner and REASON in banner
    assert "<b>cam</b>: every method&#x27;s maps of the probe images are degenerate (all zero)" in banner
    assert "<b>tsne</b>: collapsed features: no neighbourhoods to embed" in banner and "<b>faithfulness</b>" in banner
    # A skipped analysis's figure is not shown, even where a PNG of it is there; its reason is.
    shown = lambda tid: set(re.findall(r'interpret/(\w+)\.png"', sections[tid]))  # noqa: E731
    assert shown(bad) == {"curves"} and shown(good) == set(figures)
    assert 'class="banner"' not in sections[good] + sections["l2-lr1e-3-s0"]
    # Marked in the trials and interpretation tables and in the pivots it counts in.
    assert re.search(rf'<tr class=degenerate><td><a href="#t-{bad}">{bad}</a></td>.*?<td class="text">yes</td>', page)
    assert re.search(r"<td[^>]*>0\.2000 n=1 †</td>", page)
    assert f'† includes a degenerate trial: <a href="#t-{bad}">{bad}</a>' in page
    assert f'<td class="text">degenerate: {REASON}</td>' in page  # the trials table's note says why
    assert "0.3100 ± 0.0200</td><td>0.2500 ± 0.0300</td><td>10</td>" in page  # insertion beside its baseline, n

    block = re.search(r'<h2 id="provenance">Provenance</h2>(.*?)</table>', page, re.S).group(1)
    dump = features.read(sweep / "trials" / good / "features.h5")
    for text in (f"git commit {dump.git_commit[:12]}", f"torch {dump.versions['torch']}",
                 f"numpy {dump.versions['numpy']}", "precision fp32 (as configured)", "device cpu",
                 f"content sha256 {digest}", "source /data/cifar", "submitted: sweep 4242, postprocess 4243",
                 "trials ran in jobs 4242", f"retried or requeued: {good} (2 attempts)", "gpu07", "first attempt 20",
                 "last result 20", "interpreted on cpu"):
        assert text in block, text
    assert f"2 attempts on {first['host']}, gpu07 (from epochs 1, 2), SLURM job 4242" in sections[good]
    assert f"1 attempt on {first['host']}, " in sections[bad]


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--cam-methods", "gradcam,nope"], "--cam-methods: nope"),
    (["--cam-methods", "cam"], "--cam-methods: cam"),
    (["--probes-per-class", "0"], "--probes-per-class: must be >= 1"),
    (["--workers", "0"], "--workers: must be >= 1"),
])
def test_bad_postprocess_options_fail_before_any_work(trained_sweep, tmp_path, capsys, args, message):
    from vgg_xai.cli import main

    sweep = _copy(trained_sweep, tmp_path / "tiny")
    assert main(["postprocess", str(sweep), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
    assert not list(sweep.glob("trials/*/interpret")) and not (sweep / "tables").exists()


def test_postprocess_of_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    from vgg_xai.cli import main

    assert main(["postprocess", str(tmp_path)]) == 2
    assert "not a sweep folder" in capsys.readouterr().err
