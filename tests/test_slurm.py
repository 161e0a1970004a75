"""SLURM dispatch against a real single-node SLURM (cluster/local-slurm), and multi-node Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import processes, ray_processes
from vgg_xai.results import collect_rows

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


def _spec(tmp_path: Path, cache: Path, **over) -> Path:
    d = {"name": "s", "data": {"source": str(cache)}, "model": {"width": 0.125},
         "grid": {"variant": ["plain", "bn"], "lr_schedule": ["const_1e-3"]},
         "training": {"epochs": 1, "batch_size": 64, "precision": "fp32"},
         "resources": {"cpu": 1}, "retries": 1, "results": str(tmp_path / "results")}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
        if isinstance(d[k], dict):
            d[k] = {kk: vv for kk, vv in d[k].items() if vv is not None}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _profile(tmp_path: Path, **over) -> Path:
    d = {"partition": "debug", "nodes": 1, "cpus_per_task": 2, "mem_gb": 2, "time_min": 30, "signal_delay_s": 60}
    d.update(over)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vgg_xai.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _submit(*args: str) -> dict[str, str]:
    r = _cli("submit", *args)
    assert r.returncode == 0, r.stderr
    return {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()
            if line.split()[0] in ("sweep", "postprocess", "trial")}


def _states(ids: list[str]) -> dict[str, str]:
    from vgg_xai.slurm import job_states

    return {k: v["state"] for k, v in job_states(ids).items()}


def _wait_states(ids: list[str], timeout: float = 600) -> dict[str, str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = _states(ids)
        if len(s) == len(ids) and all(v in FINAL for v in s.values()):
            return s
        time.sleep(1)
    raise AssertionError(f"jobs {ids} did not end: {_states(ids)}")


def _attempts(trial_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (trial_dir / "attempts.jsonl").read_text().splitlines()]


ROOT = Path(__file__).resolve().parents[1]
BASE = {"nodes": 1, "tasks_per_node": 1, "timeout_min": 60, "slurm_signal_delay_s": 60, "slurm_setup": [],
        "mem_gb": 4, "slurm_partition": "debug"}  # cluster/local.yaml's settings in every job
# What submit gives submitit for each job, recorded for the repository's profiles and jobs/smoke.yaml.
SBATCH = {
    ("local.yaml", "sweep"): {**BASE, "name": "vgg-xai-smoke", "cpus_per_task": 2, "slurm_additional_parameters": {}},
    ("local.yaml", "trial"): {**BASE, "name": "vgg-xai-smoke", "cpus_per_task": 1, "slurm_additional_parameters": {},
                              "slurm_array_parallelism": 15},
    ("local.yaml", "postprocess"): {**BASE, "name": "vgg-xai-smoke-post", "cpus_per_task": 2,
                                    "slurm_additional_parameters": {"dependency": "afterany:41"}},
    ("local-multi.yaml", "sweep"): {**BASE, "name": "vgg-xai-smoke", "nodes": 2, "cpus_per_task": 2,
                                    "slurm_additional_parameters": {}},
    ("example-gpu.yaml", "sweep"): {
        "name": "vgg-xai-smoke", "nodes": 1, "tasks_per_node": 1, "cpus_per_task": 32, "gpus_per_node": 4,
        "timeout_min": 480, "slurm_signal_delay_s": 180, "mem_gb": 128, "slurm_partition": "gpu",
        "slurm_account": "my-project", "slurm_qos": "normal", "slurm_additional_parameters": {},
        "slurm_setup": ['export OMP_NUM_THREADS="8"', "module load cuda", "source $HOME/venvs/vgg-xai/bin/activate"]},
    ("example-gpu.yaml", "postprocess"): {
        "name": "vgg-xai-smoke-post", "nodes": 1, "tasks_per_node": 1, "cpus_per_task": 32, "timeout_min": 480,
        "slurm_signal_delay_s": 180, "mem_gb": 128, "slurm_partition": "gpu", "slurm_account": "my-project",
        "slurm_qos": "normal", "slurm_additional_parameters": {"dependency": "afterany:41"},
        "slurm_setup": ['export OMP_NUM_THREADS="8"', "module load cuda", "source $HOME/venvs/vgg-xai/bin/activate"]},
}


@pytest.mark.parametrize("profile, role", list(SBATCH), ids=[f"{p}-{r}" for p, r in SBATCH])
def test_job_parameters_are_the_recorded_ones_and_submitit_takes_them(profile, role, tmp_path):
    """The sbatch settings of each job, from a profile and a spec alone, against the recorded ones; submitit's
    SLURM executor takes them as they are (it refuses a parameter it does not know). No SLURM is asked."""
    import submitit

    from vgg_xai.config import ClusterProfile, JobSpec
    from vgg_xai.slurm import job_parameters

    spec = JobSpec.from_yaml(ROOT / "jobs" / "smoke.yaml")
    params = job_parameters(ClusterProfile.from_yaml(ROOT / "cluster" / profile), spec, role, after="41",
                            tasks=len(spec.trials("/c.h5")))
    assert params == SBATCH[profile, role]
    submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm").update_parameters(**params)


def test_array_tasks_at_once_and_whole_resources_per_task():
    from vgg_xai.config import ClusterProfile, JobSpec
    from vgg_xai.slurm import job_parameters

    spec = JobSpec.from_yaml(ROOT / "jobs" / "smoke.yaml", ["resources.cpu=1.5", "resources.gpu=0.25"])
    params = job_parameters(ClusterProfile.from_yaml(ROOT / "cluster" / "local.yaml"), spec, "trial", tasks=15,
                            max_concurrent=4)
    assert (params["cpus_per_task"], params["gpus_per_node"], params["slurm_array_parallelism"]) == (2, 1, 4)
    with pytest.raises(ValueError, match="role 'array' is not one of sweep, trial, postprocess"):
        job_parameters(ClusterProfile(), spec, "array")


@pytest.mark.slow
def test_sweep_job_then_postprocess_job(slurm, tmp_path, tiny_cache):
    t0 = time.monotonic()
    jobs = _submit(str(_spec(tmp_path, tiny_cache)), "--cluster", str(_profile(tmp_path)))
    states = _wait_states([jobs["sweep"], jobs["postprocess"]])
    print(f"\nsubmit to done (sweep + post-processing, 2 trials x 1 epoch): {time.monotonic() - t0:.1f} s")
    assert states == {jobs["sweep"]: "COMPLETED", jobs["postprocess"]: "COMPLETED"}
    times = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,Start,End", "-j",
                            f"{jobs['sweep']},{jobs['postprocess']}"], capture_output=True, text=True).stdout
    when = {line.split("|")[0]: line.split("|")[1:] for line in times.splitlines()}
    assert when[jobs["postprocess"]][0] >= when[jobs["sweep"]][1]  # afterany: it started when the sweep ended
    sweep = tmp_path / "results" / "s"
    rows = collect_rows(sweep)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert (sweep / "tables" / "accuracy.csv").is_file()
    for r in rows:
        assert _attempts(sweep / "trials" / r["trial_id"])[0]["slurm_job_id"] == jobs["sweep"]
    out = _cli("status", str(sweep)).stdout
    assert f"{jobs['sweep']:<14} sweep        COMPLETED" in out and "plain-lr1e-3-s0" in out


@pytest.mark.slow
def test_requeued_sweep_resumes_without_retraining(slurm, tmp_path, tiny_cache):
    spec = _spec(tmp_path, tiny_cache, grid={"epochs": [1, 25]}, training={"epochs": None})
    jobs = _submit(str(spec), "--cluster", str(_profile(tmp_path)))
    trials = tmp_path / "results" / "s" / "trials"
    end = time.monotonic() + 300
    while not (len(list(trials.glob("*epochs1/result.json"))) == 2 and len(list(trials.glob("*epochs25/checkpoint.pt"))) == 2):
        assert time.monotonic() < end, _states([jobs["sweep"]])
        time.sleep(0.5)
    short = sorted(trials.glob("*epochs1"))
    stamp = {d: (d / "result.json").stat().st_mtime_ns for d in short}
    t0 = time.monotonic()
    subprocess.run(["scontrol", "requeue", jobs["sweep"]], check=True, capture_output=True)
    long_dirs = sorted(trials.glob("*epochs25"))
    end = time.monotonic() + 300
    while not all(len(_attempts(d)) >= 2 for d in long_dirs):
        assert time.monotonic() < end, "the requeued job did not resume"
        time.sleep(0.5)
    print(f"\nrequeue to resumed: {time.monotonic() - t0:.1f} s")
    states = _wait_states([jobs["sweep"], jobs["postprocess"]])
    assert set(states.values()) == {"COMPLETED"}
    for d in short:
        assert len(_attempts(d)) == 1 and (d / "result.json").stat().st_mtime_ns == stamp[d]
    for d in long_dirs:
        a = _attempts(d)
        assert a[-1]["start_epoch"] >= 1  # from its checkpoint, not from scratch
    assert all(r["status"] == "completed" for r in collect_rows(tmp_path / "results" / "s"))


@pytest.mark.slow
def test_a_job_that_raises_shows_its_error_in_status(slurm, tmp_path, tiny_cache):
    data = tmp_path / "gone.h5"
    shutil.copy(tiny_cache, data)
    # the job starts 10 s after submission; the data it was told to use is gone by then
    jobs = _submit(str(_spec(tmp_path, data)), "--cluster", str(_profile(tmp_path, extra_sbatch={"begin": "now+10"})))
    data.unlink()
    # the post-processing job does not wait for ever on a sweep that failed: it ends, and says why
    states = _wait_states([jobs["sweep"], jobs["postprocess"]], timeout=300)
    assert states == {jobs["sweep"]: "FAILED", jobs["postprocess"]: "FAILED"}
    r = _cli("status", str(tmp_path / "results" / "s"))
    assert r.returncode == 0
    assert "gone.h5: no such file or folder" in r.stdout
    assert "nothing to post-process" in r.stdout and "no trial completed (2 pending)" in r.stdout, r.stdout
    assert "plain-lr1e-3-s0" in r.stdout and "not started" in r.stdout


@pytest.mark.slow
def test_array_mode(slurm, tmp_path, tiny_cache):
    jobs_out = _cli("submit", str(_spec(tmp_path, tiny_cache)), "--cluster", str(_profile(tmp_path)),
                    "--mode", "array", "--max-concurrent", "1")
    assert jobs_out.returncode == 0, jobs_out.stderr
    ids = [line.split()[1] for line in jobs_out.stdout.splitlines() if line.split()[0] in ("trial", "postprocess")]
    assert len(ids) == 3 and ids[0].endswith("_0") and ids[1].endswith("_1")
    states = _wait_states(ids)
    assert set(states.values()) == {"COMPLETED"}
    sweep = tmp_path / "results" / "s"
    rows = collect_rows(sweep)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    task_ids = {_attempts(sweep / "trials" / r["trial_id"])[0]["slurm_job_id"] for r in rows}
    assert len(task_ids) == 2  # one SLURM task a trial
    assert (sweep / "tables" / "accuracy.json").is_file()


@pytest.mark.slow
def test_cancel_leaves_no_process(slurm, tmp_path, tiny_cache):
    spec, profile = _spec(tmp_path, tiny_cache, training={"epochs": 200}), _profile(tmp_path)
    jobs = _submit(str(spec), "--cluster", str(profile))
    trials = tmp_path / "results" / "s" / "trials"
    end = time.monotonic() + 300
    while not list(trials.glob("*/checkpoint.pt")):
        assert time.monotonic() < end
        time.sleep(0.5)
    r = _cli("cancel", str(tmp_path / "results" / "s"))
    assert r.returncode == 0 and jobs["sweep"] in r.stdout
    states = _wait_states([jobs["sweep"]])
    assert states[jobs["sweep"]].startswith("CANCELLED")
    end = time.monotonic() + 60
    while ray_processes() or _job_processes(tmp_path):
        assert time.monotonic() < end, (ray_processes(), _job_processes(tmp_path))
        time.sleep(1)
    # once SLURM has no job of it queued, status names the command that continues the cancelled sweep, as submit
    # recorded it
    end = time.monotonic() + 120
    while "no SLURM job of this sweep is queued" not in (st := _cli("status", str(tmp_path / "results" / "s")).stdout):
        assert time.monotonic() < end, st
        time.sleep(2)
    st = st.splitlines()
    hint = [i for i, line in enumerate(st) if line.endswith("nothing is running them; to continue, run:")]
    assert len(hint) == 1 and st[hint[0] + 1] == f"  vgg-xai submit {spec} --cluster {profile}", st


def _job_processes(tmp_path: Path) -> list[str]:
    return [cmd for cmd in processes("submitit") if str(tmp_path) in cmd]


@pytest.mark.slow
def test_fake_gpu_trial_gets_cuda_visible_devices(slurm, tmp_path, tiny_cache):
    gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True).stdout
    if "gpu" not in gres:
        pytest.skip("this SLURM has no GPUs (start cluster/local-slurm/local-slurm with --gpus 2)")
    spec = _spec(tmp_path, tiny_cache, grid={"variant": ["bn"]}, resources={"cpu": 1, "gpu": 1},
                 training={"device": "cpu"})
    jobs = _submit(str(spec), "--cluster", str(_profile(tmp_path, gpus_per_node=1)))
    assert _wait_states([jobs["sweep"]])[jobs["sweep"]] == "COMPLETED"
    a = _attempts(tmp_path / "results" / "s" / "trials" / "bn-lr1e-3-s0")[0]
    assert a["cuda_visible_devices"] not in (None, "")


@pytest.mark.slow
def test_bad_profiles_fail_before_submission(slurm, tmp_path, tiny_cache):
    spec = str(_spec(tmp_path, tiny_cache))
    cases = [({"partition": "nope"}, "partition: 'nope' does not exist on this cluster; partitions: debug"),
             ({"gpus_per_node": 64}, "gpus_per_node: 64, but partition debug's nodes have"),
             ({"time_min": 1}, "time_min: 1 min leaves no time to work and checkpoint")]
    for over, message in cases:
        r = _cli("submit", spec, "--cluster", str(_profile(tmp_path, **over)))
        assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "results" / "s" / "slurm" / "jobs.json").exists()


def test_submit_without_sbatch_says_so(tmp_path, tiny_cache):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    r = subprocess.run([sys.executable, "-m", "vgg_xai.cli", "submit", str(_spec(tmp_path, tiny_cache)), "--cluster",
                        str(_profile(tmp_path))], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "sbatch not found on PATH" in r.stderr


@pytest.mark.slow
def test_submitit_timeout_signal_checkpoints_requeues_and_resumes(slurm, tmp_path, tiny_cache):
    """SLURM's warning before the time limit, as submitit asks for it (--signal=USR2@signal_delay_s) and
    as submitit's own test helper sends it (`scancel --signal USR2`, SlurmJob._interrupt): submitit's
    handler calls SweepJob.checkpoint (which stops Ray), requeues the job and exits; the requeued job
    resumes the interrupted trial from its checkpoint and leaves the finished one alone."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    spec = _spec(tmp_path, tiny_cache, grid={"variant": ["bn"], "epochs": [1, 12]}, training={"epochs": None})
    jobs = _submit(str(spec), "--cluster", str(_profile(tmp_path)))
    job = jobs["sweep"]
    sbatch = (tmp_path / "results" / "s" / "slurm" / job / f"{job}_submission.sh").read_text()
    assert f"--signal={SlurmJobEnvironment.USR_SIG}@60" in sbatch  # the profile's signal_delay_s
    trials = tmp_path / "results" / "s" / "trials"
    short, long_ = trials / "bn-lr1e-3-s0-epochs1", trials / "bn-lr1e-3-s0-epochs12"
    end = time.monotonic() + 300
    while not ((short / "result.json").is_file() and (long_ / "checkpoint.pt").is_file()):
        assert time.monotonic() < end, _states([job])
        time.sleep(0.2)
    stamp = (short / "result.json").stat().st_mtime_ns
    subprocess.run(["scancel", "--signal", SlurmJobEnvironment.USR_SIG, job], check=True, capture_output=True)
    t0 = time.monotonic()
    assert not (long_ / "result.json").exists()  # the signal came while the long trial was training
    end = time.monotonic() + 300
    while len(_attempts(long_)) < 2:
        assert time.monotonic() < end, f"the requeued job did not resume: {_states([job])}"
        time.sleep(0.5)
    print(f"\nsignal to resumed: {time.monotonic() - t0:.1f} s")
    states = _wait_states([job, jobs["postprocess"]])
    assert states == {job: "COMPLETED", jobs["postprocess"]: "COMPLETED"}

    # SLURM ran the same job id twice: first requeued, then to the end
    runs = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", job],
                          capture_output=True, text=True, check=True).stdout.split()
    assert runs == [f"{job}|REQUEUED", f"{job}|COMPLETED"], runs
    # ... because submitit's handler checkpointed and requeued it (its log of the first run)
    log = "".join(p.read_text(errors="replace") for p in (tmp_path / "results" / "s" / "slurm" / job).glob("*_log.*"))
    sig = f"SIG{SlurmJobEnvironment.USR_SIG}"
    # (not its "Requeued job" line: submitit writes it after `scontrol requeue` returns, and SLURM may
    # end the job first; the REQUEUED state above is the requeue itself)
    for line in (f"Caught signal {sig}", "Calling checkpoint method."):
        assert line in log, log[-3000:]

    # the finished trial was not run again; the interrupted one went on from its checkpoint
    assert len(_attempts(short)) == 1 and (short / "result.json").stat().st_mtime_ns == stamp
    first, second = _attempts(long_)
    assert first["slurm_job_id"] == second["slurm_job_id"] == job
    assert second["start_epoch"] >= 1 and second["pid"] != first["pid"]
    rows = {r["trial_id"]: r for r in collect_rows(tmp_path / "results" / "s")}
    assert rows[long_.name]["status"] == "completed" and rows[long_.name]["epochs"] == 12
    assert rows[short.name]["status"] == "completed"


@pytest.mark.slow
def test_submit_with_an_archive_as_data(slurm, tmp_path, sources):
    """The README's SLURM example: --data names an archive; submit prepares it and hands the job the
    prepared cache, which is the same data (by content digest), not a changed spec."""
    spec = _spec(tmp_path, sources["tar_gz"], data={"source": None, "cache": str(tmp_path / "cache.h5")})
    jobs = _submit(str(spec), "--cluster", str(_profile(tmp_path)), "--data", str(sources["tar_gz"]))
    states = _wait_states([jobs["sweep"], jobs["postprocess"]])
    assert states == {jobs["sweep"]: "COMPLETED", jobs["postprocess"]: "COMPLETED"}, _cli(
        "status", str(tmp_path / "results" / "s")).stdout
    sweep = tmp_path / "results" / "s"
    assert (sweep / "tables" / "accuracy.csv").is_file() and (sweep / "report.html").is_file()
    assert [r["status"] for r in collect_rows(sweep)] == ["completed", "completed"]


@pytest.mark.slow
def test_submit_into_a_sweep_whose_jobs_are_queued_is_refused(slurm, tmp_path, tiny_cache):
    spec = str(_spec(tmp_path, tiny_cache))
    jobs = _submit(spec, "--cluster", str(_profile(tmp_path, extra_sbatch={"begin": "now+600"})))
    try:
        r = _cli("submit", spec, "--cluster", str(_profile(tmp_path)))
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"{jobs['sweep']} (PENDING)" in r.stderr and "still queued or running" in r.stderr
        record = json.loads((tmp_path / "results" / "s" / "slurm" / "jobs.json").read_text())
        assert len(record) == 1  # nothing more was submitted
    finally:
        _cli("cancel", str(tmp_path / "results" / "s"))
    _wait_states([jobs["sweep"], jobs["postprocess"]])
    assert _cli("submit", spec, "--cluster", str(_profile(tmp_path))).returncode == 0  # free again


@pytest.mark.slow
def test_two_sweep_jobs_share_a_node(slurm, tmp_path, tiny_cache):
    """SLURM puts several users' jobs on one node: each sweep job's Ray is its own."""
    ids, sweeps = [], []
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        spec = _spec(d, tiny_cache, name=name, grid={"variant": ["bn"]})
        jobs = _submit(str(spec), "--cluster", str(_profile(d, cpus_per_task=1)))
        ids += [jobs["sweep"], jobs["postprocess"]]
        sweeps.append(d / "results" / name)
    assert set(_wait_states(ids).values()) == {"COMPLETED"}
    times = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,Start,End", "-j", f"{ids[0]},{ids[2]}"],
                           capture_output=True, text=True).stdout
    (s0, e0), (s1, e1) = [line.split("|")[1:] for line in times.splitlines()]
    assert s1 < e0 and s0 < e1, times  # the two sweep jobs ran at the same time
    clusters = [_attempts(s / "trials" / "bn-lr1e-3-s0")[0]["ray"] for s in sweeps]
    assert all(clusters) and clusters[0] != clusters[1]  # two Ray clusters, one a job


@pytest.mark.slow
def test_a_grown_spec_submits_only_what_has_to_run(slurm, tmp_path, tiny_cache):
    """Two growths in a row on SLURM: an array of only the new trials, then a Ray job that takes every trial
    to more epochs; a growth submitted while that job is queued is refused."""
    grid = {"variant": ["plain", "bn"], "lr_schedule": ["const_1e-3"]}
    bn_seeds = {"variant": ["bn"], "lr_schedule": ["const_1e-3"], "seed": [1, 2]}
    cluster, sweep = str(_profile(tmp_path)), tmp_path / "results" / "s"
    first = _submit(str(_spec(tmp_path, tiny_cache)), "--cluster", cluster, "--mode", "array")
    _wait_states(list(first.values()))

    r = _cli("submit", str(_spec(tmp_path, tiny_cache, grid=[grid, bn_seeds])), "--cluster", cluster, "--mode", "array")
    assert r.returncode == 0, r.stderr
    assert "sweep s: +2 new trials, 2 kept, 0 retrained" in r.stderr
    tasks = [line.split()[1] for line in r.stdout.splitlines() if line.split()[0] == "trial"]
    assert len(tasks) == 2  # an array of the two new trials only
    post = [line.split()[1] for line in r.stdout.splitlines() if line.split()[0] == "postprocess"]
    assert set(_wait_states(tasks + post).values()) == {"COMPLETED"}
    assert {d.name: len(_attempts(d)) for d in (sweep / "trials").iterdir()} == dict.fromkeys(
        ["plain-lr1e-3-s0", "bn-lr1e-3-s0", "bn-lr1e-3-s1", "bn-lr1e-3-s2"], 1)

    longer = str(_spec(tmp_path, tiny_cache, grid=[grid, bn_seeds], training={"epochs": 2}))
    queued = _submit(longer, "--cluster", str(_profile(tmp_path, extra_sbatch={"begin": "now+600"})))
    cluster = str(_profile(tmp_path))  # the same file again, without the delay
    try:
        more = _spec(tmp_path, tiny_cache, grid=[grid, {**bn_seeds, "seed": [1, 2, 3]}], training={"epochs": 2})
        r = _cli("submit", str(more), "--cluster", cluster)
        assert r.returncode == 2 and "still queued or running" in r.stderr, r.stderr
    finally:
        _cli("cancel", str(sweep))
    _wait_states(list(queued.values()))
    jobs = _submit(str(_spec(tmp_path, tiny_cache, grid=[grid, bn_seeds], training={"epochs": 2})), "--cluster", cluster)
    assert set(_wait_states(list(jobs.values())).values()) == {"COMPLETED"}
    rows = collect_rows(sweep)
    assert [(r["status"], r["epochs"]) for r in rows] == [("completed", 2)] * 4
    for d in (sweep / "trials").iterdir():
        assert [a["start_epoch"] for a in _attempts(d)] == [0, 1], d.name  # on from epoch 1, not trained again
