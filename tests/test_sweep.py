"""Sweeps on a real local Ray, driven through the CLI as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ray_processes
from vgg_xai import features
from vgg_xai.config import JobSpec
from vgg_xai.errors import UserError
from vgg_xai.results import collect_rows

pytestmark = pytest.mark.slow


def _spec(tmp_path: Path, cache: Path, **over) -> Path:
    d = {"name": "t", "data": {"source": str(cache)}, "model": {"width": 0.125},
         "grid": {"variant": ["plain", "bn"], "lr_schedule": ["const_1e-3", "alternate"]},
         "training": {"epochs": 2, "batch_size": 64, "precision": "fp32"},
         "resources": {"cpu": 1}, "retries": 1, "results": str(tmp_path / "results")}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
        if isinstance(d[k], dict):
            d[k] = {kk: vv for kk, vv in d[k].items() if vv is not None}  # None removes a key
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _sweep(spec: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vgg_xai.cli", "sweep", str(spec), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before {what}: {proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _attempts(trial_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (trial_dir / "attempts.jsonl").read_text().splitlines()]


def _no_ray_left():
    _wait_for(lambda: not ray_processes(), 30, "Ray processes to exit")


def test_small_sweep_completes_and_its_table_is_right(tmp_path, tiny_cache):
    proc = _sweep(_spec(tmp_path, tiny_cache))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    sweep = tmp_path / "results" / "t"
    rows = collect_rows(sweep)
    assert sorted(r["trial_id"] for r in rows) == sorted(
        ["plain-lr1e-3-s0", "plain-lralt-s0", "bn-lr1e-3-s0", "bn-lralt-s0"])
    table = json.loads((sweep / "tables" / "accuracy.json").read_text())
    for row in table["rows"]:
        assert row["status"] == "completed" and row["epochs"] == 2
        dump = features.read(sweep / "trials" / row["trial_id"] / "features.h5")
        assert row["test_acc"] == pytest.approx((dump.predictions == dump.labels).mean())
        hist = dump.history["valid_acc"]
        assert row["best_valid_acc"] == pytest.approx(hist.max()) and row["best_epoch"] == int(hist.argmax()) + 1
        cell = table["pivot"]["cells"][f"{row['variant']}|{row['lr_schedule']}"]
        assert cell["n"] == 1 and cell["mean"] == pytest.approx(row["test_acc"]) and cell["std"] == 0
    csv_lines = (sweep / "tables" / "accuracy.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("trial_id,variant,lr_schedule,seed,status")
    md = (sweep / "tables" / "accuracy.md").read_text()
    assert "| plain |" in md and "const_1e-3" in md
    assert "plain" in out and "alternate" in out  # the pivot printed at the end
    assert yaml.safe_load((sweep / "spec.yaml").read_text())["data"]["cache"] == str(tiny_cache)
    assert (sweep / "ray").is_dir()
    _no_ray_left()


def test_killed_worker_is_retried_from_its_checkpoint(tmp_path, tiny_cache):
    spec = _spec(tmp_path, tiny_cache, grid={"variant": ["bn"], "lr_schedule": ["const_1e-3"]},
                 training={"epochs": 8}, retries=2)
    trial = tmp_path / "results" / "t" / "trials" / "bn-lr1e-3-s0"
    proc = _sweep(spec)
    _wait_for(lambda: (trial / "checkpoint.pt").is_file(), 300, "the first epoch's checkpoint", proc)
    pid = _attempts(trial)[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    attempts = _attempts(trial)
    assert len(attempts) == 2 and attempts[1]["pid"] != pid
    assert 1 <= attempts[1]["start_epoch"] < 8  # resumed from a checkpoint, not from scratch
    result = json.loads((trial / "result.json").read_text())
    assert result["status"] == "completed" and result["epochs_completed"] == 8
    hist = features.read(trial / "features.h5").history
    assert list(hist["epoch"]) == list(range(1, 9))
    _no_ray_left()


def test_interrupted_driver_resumes_without_retraining_finished_trials(tmp_path, tiny_cache):
    spec = _spec(tmp_path, tiny_cache, grid={"variant": ["plain", "bn"], "lr_schedule": ["const_1e-3"],
                                             "epochs": [1, 10]}, training={"epochs": None})
    trials = tmp_path / "results" / "t" / "trials"
    proc = _sweep(spec)
    short = _wait_for(lambda: [p.parent for p in trials.glob("*-epochs1/result.json")], 300, "a finished trial",
                      proc)
    long_running = [p.parent for p in trials.glob("*-epochs10/checkpoint.pt")]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    assert "run the same command again" in out
    _no_ray_left()
    stamps = {d: (d / "result.json").stat().st_mtime_ns for d in short}

    proc = _sweep(spec)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    for d in short:  # not trained again
        assert (d / "result.json").stat().st_mtime_ns == stamps[d] and len(_attempts(d)) == 1
    for d in long_running:  # went on from its checkpoint
        starts = [a["start_epoch"] for a in _attempts(d)]
        assert starts[0] == 0 and starts[-1] >= 1
    rows = collect_rows(tmp_path / "results" / "t")
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    _no_ray_left()


def test_a_trial_that_fails_for_good_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_cache):
    spec = _spec(tmp_path, tiny_cache, grid={"variant": ["bn"], "lr_schedule": ["const_1e-3"],
                                             "device": ["cpu", "cuda"]}, retries=1)
    proc = _sweep(spec)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out
    rows = {r["trial_id"]: r for r in collect_rows(tmp_path / "results" / "t")}
    assert rows["bn-lr1e-3-s0-devicecpu"]["status"] == "completed"
    assert rows["bn-lr1e-3-s0-devicecuda"]["status"] == "failed"
    err = (tmp_path / "results" / "t" / "trials" / "bn-lr1e-3-s0-devicecuda" / "error.txt").read_text()
    assert "cuda" in err
    assert "failed after 1 retries: bn-lr1e-3-s0-devicecuda" in out
    _no_ray_left()


def test_changed_spec_is_refused_and_force_new_keeps_the_old(tmp_path, tiny_cache):
    from vgg_xai import sweep

    spec = JobSpec.from_yaml(_spec(tmp_path, tiny_cache))
    sweep.plan(spec)
    changed = JobSpec.from_yaml(_spec(tmp_path, tiny_cache, training={"epochs": 3}))
    with pytest.raises(UserError, match=r"spec changed .*fixed.epochs: 2 -> 3.*--force-new"):
        sweep.plan(changed)
    sweep.plan(changed, force_new=True)
    olds = list((tmp_path / "results").glob("t.old-*"))
    assert len(olds) == 1 and (olds[0] / "spec.yaml").is_file()


@pytest.mark.parametrize("change,message", [
    ({"grid": {"variant": ["bn", "resnet"]}}, "variant: 'resnet' is not a preset"),
    ({"grid": {"lr_schedule": ["cosine"]}}, "lr_schedule: 'cosine' is not one of const_1e-3, const_1e-2, alternate"),
    ({"model": {"widht": 0.5}}, "model: unknown key(s) widht; allowed: arch, width, head, init, dropout_p"),
    ({"resources": {"gpu": 1}}, "resources.gpu: 1 per trial, but this machine has 0 GPUs"),
    ({"resources": {"cpu": 64}}, "resources.cpu: 64 per trial, but this machine has"),
    ({"retries": -1}, "retries: expected a whole number >= 0"),
    ({"grid": {"epochs": [1, 2]}}, "epochs is set in both grid and training; set it once"),
    ({"training": {"epochs": "many"}}, "epochs: expected int"),
])
def test_bad_specs_fail_before_ray_starts(change, message, tmp_path, tiny_cache):
    import torch

    if "gpu" in change.get("resources", {}) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so the request is valid")
    before = ray_processes()
    r = subprocess.run([sys.executable, "-m", "vgg_xai.cli", "sweep", str(_spec(tmp_path, tiny_cache, **change))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results" / "t").exists()
    assert ray_processes() == before


def test_dry_run_lists_trials_and_runs_nothing(tmp_path, tiny_cache):
    spec = _spec(tmp_path, tiny_cache, grid={"seed": [0, 1]})
    r = subprocess.run([sys.executable, "-m", "vgg_xai.cli", "sweep", str(spec), "--dry-run"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "8 trials, 1 CPU and 0 GPU each" in r.stdout
    assert "bn-lralt-s1" in r.stdout and "[to run]" in r.stdout
    assert not (tmp_path / "results").exists()


def test_job_specs_in_the_repo_are_valid():
    root = Path(__file__).resolve().parents[1] / "jobs"
    specs = {p.stem: JobSpec.from_yaml(p) for p in root.glob("*.yaml")}
    assert {"seed", "smoke", "preliminary"} <= set(specs)
    assert len(specs["seed"].trials("/x")) == 15 and len(specs["smoke"].trials("/x")) == 15
    assert {c.epochs for _, c in specs["seed"].trials("/x")} == {15}
    assert {c.width for _, c in specs["smoke"].trials("/x")} == {0.125}
    prelim = specs["preliminary"].trials("/x")
    assert [c.variant for _, c in prelim] == ["plain", "bn", "bn_l2", "bn_l2_augment"]
    assert {c.arch for _, c in prelim} == {"simple_cnn"}
    seeds = np.unique([c.seed for _, c in specs["seed"].trials("/x")])
    assert list(seeds) == [0]
