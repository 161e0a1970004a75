"""Sweeps on a real local Ray, driven through the CLI as a user would."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import damaged_copy, ray_processes
from vgg_xai import features
from vgg_xai.config import JobSpec
from vgg_xai.errors import UserError
from vgg_xai.results import collect_rows



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


@pytest.mark.slow
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


@pytest.mark.slow
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


RAY_NOISE = ("Tuner.restore", "Failed to fetch metrics", "Token authentication", "Traceback", "raylet", "WARNING",
             "Stop signal received")


@pytest.mark.slow
def test_one_ctrl_c_stops_the_sweep_quietly_and_the_rerun_continues(tmp_path, tiny_cache):
    """Ctrl-C as a terminal sends it: SIGINT to the whole foreground process group, once. Meanwhile
    `vgg-xai status` and `status --watch` follow the sweep from another process."""
    # The long trials (30 epochs, about 20 s here) outlast the checks below even on a loaded machine.
    spec = _spec(tmp_path, tiny_cache, grid={"variant": ["plain", "bn"], "lr_schedule": ["const_1e-3"],
                                             "epochs": [1, 30]}, training={"epochs": None})
    sweep_dir = tmp_path / "results" / "t"
    trials = sweep_dir / "trials"
    # --data and --set as a user gives them (the same values as the spec's: the spec is unchanged)
    given = ["--data", str(tiny_cache), "--set", "retries=1", "--set", "grid.seed=[0]"]
    proc = _sweep(spec, *given, start_new_session=True)  # its own process group, as a shell's foreground job
    short = _wait_for(lambda: [p.parent for p in trials.glob("*-epochs1/result.json")], 300, "a finished trial",
                      proc)
    long_running = _wait_for(lambda: [p.parent for p in trials.glob("*-epochs30/checkpoint.pt")], 300,
                             "a long trial's checkpoint", proc)

    watch = subprocess.Popen([sys.executable, "-m", "vgg_xai.cli", "status", str(sweep_dir), "--watch", "0.5"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    st = _cli("status", str(sweep_dir))
    assert st.returncode == 0, st.stderr
    assert f"driver PID {proc.pid} on" in st.stdout, st.stdout
    lines = {line.split()[0]: line for line in st.stdout.splitlines()[2:] if line.strip()}
    d = long_running[0]
    worker = _attempts(d)[-1]
    assert lines[d.name].split()[1] == "running" and f":{worker['pid']}" in lines[d.name], st.stdout
    assert "/30" in lines[d.name]
    assert lines[short[0].name].split()[1].startswith("completed"), st.stdout

    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    print(f"\nSIGINT to exit: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 130, out
    tail = out[out.index("stopped:"):]
    assert "run the same command again to continue" in tail and tail.count("\n") == 1, tail
    for noise in RAY_NOISE:
        assert noise not in out, out
    assert "interpret" not in out  # no post-processing after Ctrl-C
    _no_ray_left()
    watched, _ = watch.communicate(timeout=60)  # it stops by itself once no driver runs the sweep
    assert watch.returncode == 0
    assert watched.count("sweep t:") >= 2 and "no driver running" in watched.split("sweep t:")[-1], watched

    st = _cli("status", str(sweep_dir)).stdout
    head = st.splitlines()
    states = [line.split()[1].rstrip(":") for line in head[5:] if line.strip()]
    n = {k: states.count(k) for k in ("completed", "stopped", "pending")}
    assert len(states) == 4 and n["stopped"] >= 1 and sum(n.values()) == 4, st
    # the stopped trials are counted as such, not as pending or running; nothing runs, so no ETA
    assert head[0] == f"sweep t: {n['completed']}/4 done, 0 running, {n['stopped']} stopped, {n['pending']} pending, " \
                      "0 failed · no driver running", st
    # the command that continues the sweep, with its --data and --set flags, from the folder it ran in
    assert head[1] == f"{4 - n['completed']} of 4 trials have no result and nothing is running them; to continue, " \
                      "run:", st
    assert head[2] == f"  vgg-xai sweep {spec} " + " ".join(shlex.quote(x) for x in given), st
    stopped = [line for line in st.splitlines() if line.startswith(d.name)][0]
    # trial, "stopped: at epoch N", epoch, accuracies, img/s: no ETA and no process after them
    assert stopped.split()[1:4] == ["stopped:", "at", "epoch"] and len(stopped.split()) == 9, st
    assert f":{worker['pid']}" not in stopped, st
    stamps = {d: (d / "result.json").stat().st_mtime_ns for d in short}

    # the printed command, run as a user pastes it into a shell
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(["bash", "-c", head[2].strip()], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert f"{4 - n['completed']} trials to run, {n['completed']} finished earlier" in out, out
    for d in short:  # not trained again
        assert (d / "result.json").stat().st_mtime_ns == stamps[d] and len(_attempts(d)) == 1
    for d in long_running:  # went on from its checkpoint
        starts = [a["start_epoch"] for a in _attempts(d)]
        assert starts[0] == 0 and starts[-1] >= 1
    rows = collect_rows(sweep_dir)
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    _no_ray_left()


def test_a_ctrl_c_swallowed_on_its_way_up_stays_noted():
    """What tune_grid relies on when Ray turns a KeyboardInterrupt into a status and drops it: the
    real SIGINT is noted even though the exception it raised was caught, and the handler the
    command had before is back afterwards."""
    from vgg_xai.runtime import _sigint_noted

    before = signal.getsignal(signal.SIGINT)
    with _sigint_noted() as noted:
        assert noted == []
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs here and raises
            raise AssertionError("SIGINT did not interrupt")
        except KeyboardInterrupt:
            pass  # swallowed, as a dropped status would be
        assert noted == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_a_trial_that_fails_for_good_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_cache):
    spec = _spec(tmp_path, tiny_cache, grid={"variant": ["bn"], "lr_schedule": ["const_1e-3"], "seed": [0, 1]},
                 retries=1)
    broken = tmp_path / "results" / "t" / "trials" / "bn-lr1e-3-s1"
    (broken / "attempts.jsonl").mkdir(parents=True)  # every attempt of this trial fails where it writes
    proc = _sweep(spec)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out
    rows = {r["trial_id"]: r for r in collect_rows(tmp_path / "results" / "t")}
    assert rows["bn-lr1e-3-s0"]["status"] == "completed"
    assert rows["bn-lr1e-3-s1"]["status"] == "failed"
    error = (broken / "error.txt").read_text()
    # the trial's own exception first, then its traceback, in plain text: no Ray wrapper, no colour codes
    first = error.splitlines()[0]
    assert first.startswith("IsADirectoryError: [Errno 21] Is a directory: ") and "attempts.jsonl" in first, error
    assert error.splitlines()[2] == "Traceback (most recent call last):" and "train.py" in error, error
    # from the trial's own first frame: Ray's frames above it, and their stray carets, are left out
    assert "vgg_xai" in error.splitlines()[3] and f"{os.sep}ray{os.sep}" not in error, error
    lines = error.splitlines()
    assert all(lines[i - 1].startswith("    ") and lines[i - 1].strip(" ^~") for i, x in enumerate(lines)
               if i > 3 and x.strip() and not x.strip(" ^~")), error  # a caret line only under its source line
    assert error.splitlines()[-1] == first and "\x1b" not in error and "RayTaskError" not in error, error
    assert "IsADirectoryError" in rows["bn-lr1e-3-s1"]["note"]
    assert "failed after 1 retries: bn-lr1e-3-s1" in out
    assert "Traceback" not in out  # Tune's own log of each failed attempt stays out of the output
    _no_ray_left()


def test_changed_spec_is_refused_and_force_new_keeps_the_old(tmp_path, tiny_cache):
    """A change that alters every trial (here the model's width) would keep nothing: refused."""
    from vgg_xai import sweep

    spec = JobSpec.from_yaml(_spec(tmp_path, tiny_cache))
    sweep.plan(spec)
    changed = JobSpec.from_yaml(_spec(tmp_path, tiny_cache, model={"width": 0.25}))
    with pytest.raises(UserError, match=r"spec changed .*every trial's settings changed \(width: 0.125 -> 0.25\): "
                                        r"nothing would be kept.*--force-new"):
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
    ({"training": {"device": "cuda"}}, "device: cuda was asked for but torch sees no GPU here"),
    ({"data": {"source": "/nonexistent/cifar.tar.gz"}}, "data.source: /nonexistent/cifar.tar.gz: no such file"),
    ({"data": {"source": "/nonexistent/cache.h5"}}, "data.source: /nonexistent/cache.h5: no such file or folder"),
])
def test_bad_specs_fail_before_ray_starts(change, message, tmp_path, tiny_cache):
    import torch

    if ("gpu" in change.get("resources", {}) or "device" in change.get("training", {})) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so the request is valid")
    before = ray_processes()
    r = subprocess.run([sys.executable, "-m", "vgg_xai.cli", "sweep", str(_spec(tmp_path, tiny_cache, **change))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()  # nothing written, not even the driver's lock
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


# ---------------------------------------------------------------------------- the users' paths

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vgg_xai.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def _errors(stderr: str) -> list[str]:
    """stderr's lines (Ray's start-up notice about token authentication is not among them)."""
    return [x for x in stderr.splitlines() if x.strip()]


def test_dry_run_of_the_seed_study_plans_on_any_machine(tmp_path):
    r = _cli("sweep", str(REPO / "jobs" / "seed.yaml"), "--dry-run", "--results", str(tmp_path / "results"))
    assert r.returncode == 0, r.stderr
    assert "sweep seed: 15 trials, 4 CPU and 0.25 GPU each" in r.stdout
    assert r.stdout.count("[to run]") == 15
    if (os.cpu_count() or 1) < 4:  # warned, not refused: a dry run is how one plans a cluster run
        assert "vgg-xai: warning: this machine could not run it: resources.cpu: 4 per trial" in r.stderr
    assert not (tmp_path / "results").exists()
    r = _cli("sweep", str(REPO / "jobs" / "seed.yaml"), "--dry-run", "--data", str(tmp_path / "nowhere.tar.gz"))
    assert r.returncode == 2 and "--data: " in r.stderr and "no such file or folder" in r.stderr


@pytest.mark.slow
def test_dry_run_says_when_the_real_run_would_be_refused(tmp_path, tiny_cache):
    one = {"grid": {"variant": ["bn"], "lr_schedule": ["const_1e-3"]}, "training": {"epochs": 1}}
    assert _cli("sweep", str(_spec(tmp_path, tiny_cache, **one))).returncode == 0
    changed = _spec(tmp_path, tiny_cache, **{**one, "model": {"width": 0.25}})
    r = _cli("sweep", str(changed), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "[to run]" in r.stdout and "[finished]" not in r.stdout
    assert ("a real run would be refused: the spec changed since this sweep started (every trial's settings "
            "changed (width: 0.125 -> 0.25): nothing would be kept)") in r.stderr
    r = _cli("sweep", str(changed))
    assert r.returncode == 2 and "the spec changed" in r.stderr


@pytest.mark.slow
def test_the_data_is_known_by_its_content_not_by_the_path_that_named_it(tmp_path, sources):
    """A first run with --data an archive, the next with the cache it was prepared into: the same sweep."""
    cache = tmp_path / "cache.h5"
    spec = _spec(tmp_path, cache, data={"source": None, "cache": str(cache)},
                 grid={"variant": ["bn"], "lr_schedule": ["const_1e-3"]}, training={"epochs": 1})
    r = _cli("sweep", str(spec), "--data", str(sources["tar_gz"]))
    assert r.returncode == 0, r.stdout + r.stderr
    r = _cli("sweep", str(spec), "--data", str(cache))
    assert r.returncode == 0, r.stderr
    assert "0 trials to run, 1 finished earlier" in r.stdout
    saved = yaml.safe_load((tmp_path / "results" / "t" / "spec.yaml").read_text())["data"]
    assert saved["content_sha256"] == h5py_attr(cache, "content_sha256")


def h5py_attr(path: Path, name: str):
    import h5py

    with h5py.File(path, "r") as f:
        return f.attrs[name]


def test_a_damaged_cache_is_refused_before_ray_starts(tmp_path, tiny_cache):
    damaged = damaged_copy(tiny_cache, tmp_path / "damaged.h5")
    before = ray_processes()
    r = _cli("sweep", str(_spec(tmp_path, damaged)))
    assert r.returncode == 2 and len(_errors(r.stderr)) == 1, r.stderr
    assert f"{damaged}: the data cache is damaged" in r.stderr and "--force" in r.stderr
    assert not (tmp_path / "results" / "t" / "trials").exists()
    assert ray_processes() == before


def _descendants(pid: int) -> list:
    import psutil

    return psutil.Process(pid).children(recursive=True)


def _running(procs: list) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow
def test_one_driver_per_sweep_and_a_killed_driver_leaves_nothing_running(tmp_path, tiny_cache):
    spec = _spec(tmp_path, tiny_cache, grid={"lr_schedule": ["const_1e-3"]}, training={"epochs": 12})
    trials = tmp_path / "results" / "t" / "trials"
    first = _sweep(spec)
    _wait_for(lambda: len(list(trials.glob("*/checkpoint.pt"))) == 2, 300, "both trials' first checkpoint", first)

    second = _cli("sweep", str(spec))
    assert second.returncode == 2 and len(_errors(second.stderr)) == 1, second.stderr
    assert f"another driver is running this sweep (PID {first.pid} on " in second.stderr

    ray = _descendants(first.pid)  # the embedded Ray: daemons, agents, workers, the watcher
    assert any("raylet" in " ".join(p.cmdline()) for p in ray)
    first.kill()  # SIGKILL: no handler, no finally
    first.communicate()
    _wait_for(lambda: not _running(ray), 15, "the killed driver's Ray processes to exit")
    assert not list(Path("/tmp").glob(f"vgg-xai-ray-*/session_*_{first.pid}"))  # its temp folder is gone too

    rerun = _cli("sweep", str(spec))  # the dead driver's lock is taken over
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    for d in trials.iterdir():
        starts = [a["start_epoch"] for a in _attempts(d)]
        assert starts.count(0) == 1 and starts[-1] >= 1, starts  # trained once from scratch, then resumed
    assert all(r["status"] == "completed" for r in collect_rows(tmp_path / "results" / "t"))
    _no_ray_left()


@pytest.fixture
def small_disk(tmp_path):
    """A real 100 MB file system (tmpfs), so that a sweep can run out of space; root only."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip(reason="mounting a small tmpfs to fill needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(reason=f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_rerun_continues(small_disk, tmp_path, tiny_cache):
    # 60 of the 100 MB taken: two trials' checkpoints (8.8 MB each, the one before kept) fit for one
    # epoch, not for three.
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (60 << 20))
    spec = _spec(tmp_path, tiny_cache, grid={"lr_schedule": ["const_1e-3"]}, training={"epochs": 3},
                 results=str(small_disk / "results"))
    r = _cli("sweep", str(spec))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = _errors(r.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"vgg-xai: error: no space left in {small_disk}/results/t/"), lines
    assert "needs" in lines[0] and "free; free space and run the same command again" in lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    from vgg_xai import checkpoint

    trials = sorted((small_disk / "results" / "t" / "trials").iterdir())
    for d in trials:  # what was computed is kept, and verifies
        assert checkpoint.load(d / "checkpoint.pt")["epoch"] >= 0
        assert not list(d.glob(".*tmp*"))

    filler.unlink()
    r = _cli("sweep", str(spec))
    assert r.returncode == 0, r.stdout + r.stderr
    for d in trials:
        assert json.loads((d / "result.json").read_text())["status"] == "completed"
        assert _attempts(d)[-1]["start_epoch"] >= 1  # went on from its checkpoint
    assert (small_disk / "results" / "t" / "report.html").is_file()
    _no_ray_left()


@pytest.mark.slow
def test_another_users_ray_is_neither_counted_nor_stopped(tmp_path, tiny_cache):
    """A shared machine is the normal machine: a Ray these tests did not start (its processes lack
    their mark) is invisible to ray_processes(), and a sweep beside it neither joins nor stops it."""
    import shutil

    from vgg_xai.runtime import free_port

    env = {k: v for k, v in os.environ.items() if k != "VGG_XAI_TEST_RUN"}
    temp = tempfile.mkdtemp(prefix="vgg-xai-other-", dir="/tmp")
    ip = "127.0.0.4"  # a one-machine stand-in for another user's node, as in test_multinode
    other = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                              f"--port={free_port(ip)}", f"--node-ip-address={ip}", "--num-cpus=1",
                              "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def theirs() -> set[int]:
        """The other Ray's GCS and raylet (the daemons that live as long as it does)."""
        out = set()
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    cmd = (p / "cmdline").read_bytes()
                except OSError:
                    continue
                if temp.encode() in cmd and (b"gcs_server" in cmd or b"raylet/raylet" in cmd):
                    out.add(int(p.name))
        return out

    try:
        running = _wait_for(lambda: len(theirs()) == 2 and theirs(), 120, "the other Ray to start")
        assert not any(temp in cmd for cmd in ray_processes())
        spec = _spec(tmp_path, tiny_cache, grid={"variant": ["bn"], "lr_schedule": ["const_1e-3"]},
                     training={"epochs": 1})
        r = _cli("sweep", str(spec))
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads((tmp_path / "results" / "t" / "trials" / "bn-lr1e-3-s0" / "attempts.jsonl")
                          .read_text().splitlines()[0])["ray"].startswith("127.0.0.1:")  # its own Ray, not theirs
        _no_ray_left()
        assert running <= theirs()  # still running, untouched
    finally:
        os.killpg(other.pid, signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            other.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(other.pid, signal.SIGKILL)
            other.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_an_address_where_nothing_answers_is_one_line(tmp_path, tiny_cache):
    from vgg_xai.runtime import ADDRESS_TIMEOUT_S, free_port

    address = f"127.0.0.1:{free_port('127.0.0.1')}"  # free: nothing listens there
    t0 = time.monotonic()
    r = _cli("sweep", str(_spec(tmp_path, tiny_cache)), "--address", address, timeout=300)
    assert r.returncode == 2 and len(_errors(r.stderr)) == 1, r.stderr
    assert f"--address {address}: nothing answers there within {ADDRESS_TIMEOUT_S} s" in r.stderr
    assert time.monotonic() - t0 < ADDRESS_TIMEOUT_S + 30
    assert not (tmp_path / "results").exists()
