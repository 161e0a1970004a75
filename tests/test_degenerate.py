"""Degenerate trials and crashed analyses, on the real CIFAR-10 and real training.

Two real trials on the full 10,000-image test set: plain VGG at lr 1e-2, which collapses (every
test image gets the same feature vector, one predicted class: the case that made openTSNE
segfault), and bn at lr 1e-3, which learns; and a copy of the learning one. One real
`vgg-xai postprocess` run interprets them on Ray while this test kills the worker running the
copy with SIGSEGV, as a crash in native code would. The run must name the collapsed trial
degenerate and skip what is meaningless for it, interpret the learning one fully, and record the
killed one's error while the others, the tables and the report are written.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import RUN_MARK, SHARED_DATA, ray_processes
from vgg_xai import features
from vgg_xai.config import TrialConfig
from vgg_xai.interpret.embedding import tsne_method
from vgg_xai.figures import grid_panels
from vgg_xai.interpret_arrays import read_arrays
from vgg_xai.postprocess import Settings
from vgg_xai.results import FAITHFULNESS_KEYS, SANITY_KEYS
from vgg_xai.report import TRIAL_FIGURES
from vgg_xai.train import run_trial

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SHARED_DATA.is_file(), reason=f"needs the real CIFAR-10 at {SHARED_DATA}: "
                                 "a collapsed trial is made by real training on real images")]

COLLAPSED, LEARNING, KILLED = "plain-lr1e-2-s0", "bn-lr1e-3-s0", "bn-lr1e-3-s1"
# The figures of the analyses a collapsed trial skips: none may be drawn.
SKIPPED_FIGURES = {"cam", "faithfulness", "sanity", "tsne_gmm", "bic", "contingency"}


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory) -> Path:
    """A sweep folder with the collapsed trial, the learning one and a copy of the learning one."""
    from vgg_xai.data import prepare

    base = tmp_path_factory.mktemp("real")
    cache = prepare(SHARED_DATA, base / "cifar10.h5")
    root = base / "sweep"
    # One epoch on 2,000 images; batch 32 gives lr 1e-2 the 63 steps it needs to kill every ReLU.
    common = dict(data=str(cache), width=0.125, epochs=1, train_size=2000, valid_size=500, batch_size=32,
                  precision="fp32", device="cpu")
    run_trial(TrialConfig(variant="plain", lr_schedule="const_1e-2", **common), root / "trials" / COLLAPSED)
    run_trial(TrialConfig(variant="bn", lr_schedule="const_1e-3", **common), root / "trials" / LEARNING)
    dump = features.read(root / "trials" / COLLAPSED / "features.h5")
    assert len(dump.labels) == 10_000
    assert (dump.features == dump.features[0]).all(), \
        "plain VGG at lr 1e-2 did not collapse here; this test needs a trial that did"
    shutil.copytree(root / "trials" / LEARNING, root / "trials" / KILLED)
    config = root / "trials" / KILLED / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "seed": 1}))
    return root


def _worker_holding(lock: Path) -> int | None:
    """The PID of a Ray worker this test run started (``ray::`` process title) that holds ``lock``
    open: the one interpreting that trial."""
    mark = f"VGG_XAI_TEST_RUN={RUN_MARK}".encode()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if not (p / "cmdline").read_bytes().startswith(b"ray::"):
                continue
            if mark not in (p / "environ").read_bytes().split(b"\0"):
                continue
            if any(os.readlink(fd) == str(lock) for fd in (p / "fd").iterdir()):
                return int(p.name)
        except OSError:
            continue
    return None


def _no_core_files() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the killed worker leaves no core dump


@pytest.fixture(scope="module")
def postprocessed(real_sweep, tmp_path_factory) -> SimpleNamespace:
    """`vgg-xai postprocess` over the sweep on Ray (2 workers), the copy's worker killed with SIGSEGV
    while it interprets."""
    log = tmp_path_factory.mktemp("log") / "postprocess.log"
    lock = real_sweep / "trials" / KILLED / "interpret" / ".lock"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vgg_xai.cli", "postprocess", str(real_sweep), "--workers", "2"],
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=_no_core_files)
        end, pid = time.monotonic() + 300, None
        while pid is None and proc.poll() is None and time.monotonic() < end:
            pid = _worker_holding(lock)
            time.sleep(0.1)
        if pid is None:
            proc.kill()
            proc.wait()
            pytest.fail(f"no Ray worker interpreting {KILLED} was found; output:\n{log.read_text()[-3000:]}")
        os.kill(pid, signal.SIGSEGV)
        proc.wait(timeout=1200)
    return SimpleNamespace(rc=proc.returncode, out=log.read_text(), sweep=real_sweep, pid=pid)


def _metrics(sweep: Path, tid: str) -> dict:
    def no_nan(name: str):
        raise AssertionError(f"{tid}: metrics.json holds {name}")

    return json.loads((sweep / "trials" / tid / "interpret" / "metrics.json").read_text(), parse_constant=no_nan)


def test_a_crashed_analysis_fails_alone(postprocessed):
    sweep, out = postprocessed.sweep, postprocessed.out
    assert postprocessed.rc == 1, out
    assert re.search(rf"interpretation failed: {KILLED}: WorkerCrashedError: the process running it died", out), out
    error = (sweep / "trials" / KILLED / "interpret" / "error.txt").read_text()
    assert "WorkerCrashedError" in error and "died" in error
    assert not (sweep / "trials" / KILLED / "interpret" / "metrics.json").exists()
    for tid in (COLLAPSED, LEARNING):  # the others were interpreted
        assert _metrics(sweep, tid)["trial_id"] == tid
        assert not (sweep / "trials" / tid / "interpret" / "error.txt").exists()
    # The tables and the report are written, and say the killed trial's interpretation is missing.
    rows = {r["trial_id"]: r for r in json.loads((sweep / "tables" / "accuracy.json").read_text())["rows"]}
    assert set(rows) == {COLLAPSED, LEARNING, KILLED}
    assert rows[KILLED]["ari"] is None and isinstance(rows[LEARNING]["ari"], float)
    assert rows[KILLED]["interpretation"] == "failed" and rows[LEARNING]["interpretation"] == "done"
    assert rows[KILLED]["note"].startswith("interpretation failed: WorkerCrashedError: the process running it died")
    md = (sweep / "tables" / "accuracy.md").read_text()
    assert f"no value for {KILLED}: interpretation failed: WorkerCrashedError" in md.split("## Trials")[0]
    html = (sweep / "report.html").read_text()
    section = html[html.index(f'id="t-{KILLED}"'):]
    section = section[:section.find("<h3", 1)]
    assert "interpretation failed (see interpret/error.txt)" in section
    assert ray_processes() == []


def test_a_collapsed_trial_is_named_and_its_meaningless_analyses_skipped(postprocessed):
    sweep = postprocessed.sweep
    out = sweep / "trials" / COLLAPSED / "interpret"
    m = _metrics(sweep, COLLAPSED)
    deg = m["degenerate"]
    assert deg["detected"] is True
    assert "every test image gets the same feature vector (feature std 0)" in deg["reasons"]
    assert any(re.fullmatch(r"one predicted class for all 10000 test images \(\w+\)", r) for r in deg["reasons"])
    assert any(r.startswith("class activation maps of the probe images: ") for r in deg["reasons"])
    assert deg["checks"]["distinct_features"] == 1 and deg["checks"]["predicted_classes"] == 1
    assert set(m["skipped"]) == {"cam", "faithfulness", "sanity", "tsne", "gmm"}
    assert all(isinstance(v, str) and v and "\n" not in v for v in m["skipped"].values())
    # Not computed: null, never NaN nor a made-up 0.
    s = m["summary"]
    for key in ["ari", "nmi", "purity", *FAITHFULNESS_KEYS, *SANITY_KEYS]:
        assert s[key] is None, key
    assert s["test_acc"] == pytest.approx(0.1) and 0 <= s["ece"] <= 1
    assert m["gmm"] is None and m["sanity"] is None and m["faithfulness"] is None and m["tsne"] is None
    # No panel of a skipped analysis; the rest is drawn.
    pngs = {p.stem for p in out.glob("*.png")}
    assert pngs == set(TRIAL_FIGURES) - SKIPPED_FIGURES - {"bn_histograms"}
    a = read_arrays(out / "arrays.h5")
    assert "tsne" not in a["embedding"] and "faithfulness" not in a and "sanity" not in a
    assert len(a["embedding"]["labels"]) == 10_000


def test_a_learning_trial_is_interpreted_fully_with_spread_and_sample_sizes(postprocessed):
    sweep = postprocessed.sweep
    out = sweep / "trials" / LEARNING / "interpret"
    m = _metrics(sweep, LEARNING)
    assert m["degenerate"] == {"detected": False, "reasons": [], "checks": m["degenerate"]["checks"]}
    assert m["skipped"] == {}
    s = m["summary"]
    assert s["faithfulness_n_images"] == 10 * Settings().faithfulness_per_class >= 256
    for key in ("deletion_auc", "deletion_auc_random", "insertion_auc", "insertion_auc_random"):
        assert 0 <= s[key] <= 1, key
        assert 0 < s[f"{key}_se"] < 0.05, key  # a finite standard error, small at 260 images
    assert s["sanity_n_draws"] == 3 and s["sanity_n_images"] == 50
    assert 0 <= s["sanity_n_degenerate"] <= 150
    assert s["sanity_n_pairs"] == 150
    for key in ("sanity_rho", "sanity_floor", "sanity_abs_rank_rho", "sanity_abs_floor"):
        assert -1 <= s[key] <= 1 and s[f"{key}_std"] >= 0, key
    for mode in ("deletion", "insertion"):  # the paired difference is the difference of the two means
        assert s[f"{mode}_vs_random"] == pytest.approx(s[f"{mode}_auc"] - s[f"{mode}_auc_random"], abs=1e-9)
        assert 0 < s[f"{mode}_vs_random_se"] < 0.05 and 0 <= s[f"{mode}_wins"] <= 1 and 0 <= s[f"{mode}_vs_random_p"] <= 1
    assert m["images"].startswith("accuracy, calibration, t-SNE and the mixture: the spec's test set")
    sc = m["sanity"]
    assert len(sc["spearman"]) == len(sc["layers"]) == len(sc["spearman_std"]) == len(sc["n_degenerate"])
    assert np.shape(sc["spearman_per_draw"]) == (3, len(sc["layers"]))
    assert sc["spearman"][-1] == s["sanity_rho"]
    assert m["tsne"]["method"] == tsne_method(10_000)
    assert {p.stem for p in out.glob("*.png")} == set(TRIAL_FIGURES)
    emb = read_arrays(out / "arrays.h5")["embedding"]["tsne"]
    assert emb.shape == (10_000, 2) and np.isfinite(emb).all()
    # The mixture shown and scored is one component per class, and metrics.json says so beside the BIC's choice.
    assert (m["gmm"]["k"], m["gmm"]["covariance_type"]) == (10, "full") and len(m["gmm"]["bic_best"]) == 2
    assert m["gmm"]["k_reason"].startswith("one component per class: ARI, NMI and purity compare the clusters")
    # The sweep's grids are drawn with a panel for every trial: those without maps or an embedding say why.
    for fig in ("cam_grid", "tsne_grid"):
        assert (sweep / "figures" / f"{fig}.png").is_file(), fig
        panels = grid_panels(sweep, fig)
        assert set(panels) == {COLLAPSED, LEARNING, KILLED} and panels[LEARNING] is None, panels
        assert panels[KILLED].startswith("interpretation failed: WorkerCrashedError"), panels
    skipped = _metrics(sweep, COLLAPSED)["skipped"]
    assert grid_panels(sweep, "tsne_grid")[COLLAPSED] == skipped["tsne"]
    assert grid_panels(sweep, "cam_grid")[COLLAPSED] == skipped["cam"]
