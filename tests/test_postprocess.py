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
from vgg_xai.postprocess import Settings, postprocess, read_arrays
from vgg_xai.report import TRIAL_FIGURES
from vgg_xai.train import run_trial

pytestmark = pytest.mark.slow

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
        for k in ("ece", "ari", "nmi", "purity", "deletion_auc", "insertion_auc"):
            assert 0 <= m["summary"][k] <= 1, k
        assert -1 <= m["summary"]["sanity_rho"] <= 1
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
        assert not np.allclose(a["filters"]["init"]["first_rgb"], a["filters"]["trained"]["first_rgb"])
        assert a["embedding"]["tsne"].shape == (len(a["embedding"]["labels"]), 2)
        assert a["metrics"]["confusion"].sum() == len(a["embedding"]["labels"])
        assert ("bn" in a) == (over["variant"] == "bn")
        pngs = {p.stem for p in out.glob("*.png")}
        expected = set(TRIAL_FIGURES) - (set() if over["variant"] == "bn" else {"bn_histograms"})
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
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", html)  # self-contained


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


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Checks injected into a copy of the report: errors of any kind (a resource that fails to load,
# a script error, console.error) and images that did not decode.
PROBE_HEAD = ("<script>window.__errs=[];addEventListener('error',e=>__errs.push(String(e.message||e.target.src)),true);"
              "const ce=console.error;console.error=(...a)=>{__errs.push(a.join(' '));ce(...a)};</script>")
PROBE_BODY = ("<script>addEventListener('load',()=>{const im=[...document.images];const b=document.body.dataset;"
              "b.images=im.length;b.broken=im.filter(i=>!i.complete||i.naturalWidth===0).length;"
              "b.errors=JSON.stringify(__errs)});</script>")


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-default-apps", "--no-first-run",
             "--no-pings", "--disable-domain-reliability", "--proxy-server=http://127.0.0.1:9",
             f"--user-data-dir={tmp / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=10000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium) to render the report")
def test_report_renders_in_headless_chromium(trained_sweep, tmp_path):
    sweep = _copy(trained_sweep, tmp_path / "tiny")
    postprocess(sweep, SMALL, workers=1)
    report = sweep / "report.html"
    page = report.read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_BODY + "</body>", 1))
    dom = _chromium(tmp_path, "--dump-dom", probe.as_uri()).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', body.group(1)))
    assert int(attrs["images"]) == page.count("<img ") > 10
    assert attrs["broken"] == "0"
    assert json.loads(attrs["errors"].replace("&quot;", '"')) == []

    shot = tmp_path / "report.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,3000", report.as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    assert console == []
    print(f"screenshot: {shot}")


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
