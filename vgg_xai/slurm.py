"""SLURM through submitit: the sweep job (Ray inside the allocation), the post-processing job,
array mode, status and cancel. The only module that imports submitit.

The sweep job runs one task per node. On one node it is the embedded sweep (`vgg-xai sweep`)
with the allocation's CPUs and GPUs; on several, task 0 starts a Ray head and the driver and
the other tasks join as Ray workers. The job is checkpointable: on SLURM's warning before the
time limit (or a preemption) it stops Ray and requeues itself; the requeued job resumes the
sweep from the trial folders, so finished trials are not run again.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from .atomic import atomic_write_text
from .config import ClusterProfile, JobSpec, TrialConfig
from . import runtime
from .trial_folder import TESTED
from .errors import UserError
from .locks import driving
from .trial_folder import Damaged, add_submission, read_jobs


# ---------------------------------------------------------------------------- checks

def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} not found on PATH: run this on a SLURM login node, or start the local "
                        "test cluster (cluster/local-slurm/local-slurm start)") from None
    except subprocess.CalledProcessError as e:
        raise UserError(f"{' '.join(cmd)} failed: {(e.stderr or e.stdout).strip().splitlines()[-1:]}") from None


def _minutes(limit: str) -> float:
    """SLURM time limit text (D-HH:MM:SS, HH:MM:SS, MM:SS, infinite) in minutes."""
    if limit in ("infinite", "UNLIMITED", "n/a", ""):
        return float("inf")
    days, _, rest = limit.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return (int(days or 0) * 24 + h) * 60 + m + s / 60


def check_profile(profile: ClusterProfile, spec: JobSpec, mode: str) -> None:
    """Errors before submission, from what sinfo can tell."""
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found on PATH: submit needs a SLURM login node, or the local test cluster "
                        "(cluster/local-slurm/local-slurm start, then eval \"$(cluster/local-slurm/local-slurm env)\")")
    partitions: dict[str, dict[str, Any]] = {}
    default = None
    for line in _run(["sinfo", "-h", "-o", "%P|%l|%G|%c"]).splitlines():
        name, limit, gres, cpus = line.split("|")
        if name.endswith("*"):
            name = name[:-1]
            default = name
        gpus = sum(int(m) for m in re.findall(r"gpu(?::[^:(,]+)?:(\d+)", gres))
        p = partitions.setdefault(name, {"limit": limit, "gpus": 0, "cpus": 0})
        p["gpus"] = max(p["gpus"], gpus)
        p["cpus"] = max(p["cpus"], int(cpus.rstrip("+")))
    part = profile.partition or default
    if part not in partitions:
        raise UserError(f"partition: {part!r} does not exist on this cluster; partitions: {', '.join(partitions)}")
    info = partitions[part]
    if profile.time_min > _minutes(info["limit"]):
        raise UserError(f"time_min: {profile.time_min} min is above partition {part}'s limit of {info['limit']}")
    if profile.gpus_per_node > info["gpus"]:
        raise UserError(f"gpus_per_node: {profile.gpus_per_node}, but partition {part}'s nodes have "
                        f"{info['gpus']} GPUs")
    if profile.cpus_per_task > info["cpus"]:
        raise UserError(f"cpus_per_task: {profile.cpus_per_task}, but partition {part}'s nodes have "
                        f"{info['cpus']} CPUs")
    if mode == "ray":
        if spec.cpu > profile.cpus_per_task:
            raise UserError(f"resources.cpu: {spec.cpu:g} per trial, but the profile gives a node "
                            f"{profile.cpus_per_task}")
        if spec.gpu > profile.gpus_per_node:
            raise UserError(f"resources.gpu: {spec.gpu:g} per trial, but the profile gives a node "
                            f"{profile.gpus_per_node} GPUs; set gpus_per_node in the cluster profile")
    elif spec.gpu > info["gpus"]:
        raise UserError(f"resources.gpu: {spec.gpu:g} per trial, but partition {part}'s nodes have {info['gpus']} GPUs")


# ---------------------------------------------------------------------------- what the jobs run

def _allocation() -> tuple[int, int]:
    """CPUs and GPUs SLURM gave this task."""
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE") or os.cpu_count() or 1)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    gpus = len([d for d in visible.split(",") if d.strip()]) if visible else 0
    return cpus, gpus


def _interpret(sweep_dir: Path, address: str | None = None) -> None:
    """Post-processing inside the sweep's allocation, on its Ray, while the nodes are up (the
    post-processing job after it finds the trials up to date and writes the tables again)."""
    from .postprocess import postprocess

    postprocess(sweep_dir, address=address)


WORKER_STARTS = 3  # how often a worker node starts its Ray before it gives up


@dataclass
class SweepJob(submitit.helpers.Checkpointable):
    """One sweep inside one allocation; requeued on SLURM's warning, resumed from trial folders."""

    spec: JobSpec
    data: str

    def __call__(self) -> str:
        from . import sweep

        env = submitit.JobEnvironment()
        if env.global_rank != 0:  # a Ray worker node; task 0 drives
            self._multi_node(sweep, sweep.sweep_dir_of(self.spec), env, *_allocation(), plan=None)
            return "worker"
        with driving(sweep.sweep_dir_of(self.spec)):
            return self._drive(sweep, env)

    def _drive(self, sweep, env) -> str:
        cpus, gpus = _allocation()
        plan = sweep.plan(self.spec, data=self.data, check_local=False)
        nodes = env.num_nodes
        if nodes == 1:
            started = runtime.ray_init(num_cpus=cpus, num_gpus=gpus)
            try:
                outcome = sweep.run(plan)
                _interpret(plan.sweep_dir)
            finally:
                if started:
                    runtime.ray_shutdown()
        else:
            outcome = self._multi_node(sweep, plan.sweep_dir, env, cpus, gpus, plan=plan)
        if outcome.failed:
            raise RuntimeError(f"trials failed after all retries: {', '.join(outcome.failed)}")
        return str(plan.sweep_dir)

    def _multi_node(self, sweep, sweep_dir: Path, env, cpus: int, gpus: int, plan):
        """Ray head + driver on task 0, Ray workers on the others (one task a node).

        The tasks meet through files in the sweep's slurm/ folder, which every node sees: the head's
        address, a marker that the driver is done, the cluster's token and the Ray logs. Their names
        carry the restart count, so that after a requeue (the same job id) no worker joins the head of
        the run that was stopped, or leaves at once on its marker. This is the path that the one-machine
        test (tests/test_multinode.py: a head on 127.0.0.2, a worker on 127.0.0.3) shows with the same
        start_head, start_worker, wait_for_nodes and run.
        """
        folder = sweep_dir / "slurm"
        run = f"ray-{env.job_id}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        rendezvous, done = folder / f"{run}.json", folder / f"{run}.done"
        token = folder / "ray-token"  # made by start_head, readable by this user only
        ip = self._node_ip()
        if plan is not None:  # task 0
            try:
                head = runtime.start_head(ip, cpus, gpus, folder / "ray-logs" / f"{run}-head.log", token=token,
                                        temp_dir=f"/tmp/vgg-xai-ray-{env.job_id}")
                self._nodes = [head]
                atomic_write_text(rendezvous, json.dumps({"address": head.address}))
                runtime.wait_for_nodes(head.address, env.num_nodes, ip, token=token, timeout=300, nodes=[head])
                outcome = sweep.run(plan, address=head.address)
                _interpret(plan.sweep_dir, address=head.address)
                return outcome
            finally:
                atomic_write_text(done, "")
                self._stop_ray()
        end = time.monotonic() + 600
        while not rendezvous.exists():
            if done.exists():  # the head never came up; task 0 says why
                return None
            if time.monotonic() > end:
                raise RuntimeError(f"no Ray head address in {rendezvous} after 600 s; see task 0's log")
            time.sleep(1)
        address = json.loads(rendezvous.read_text())["address"]
        log = folder / "ray-logs" / f"{run}-worker{env.global_rank}.log"
        try:
            for start in range(1, WORKER_STARTS + 1):
                self._nodes = [runtime.start_worker(address, ip, cpus, gpus, log, token=token)]
                while not done.exists() and self._nodes[0].proc.poll() is None:
                    time.sleep(2)
                if done.exists():
                    return None
                # This node's Ray ended (or never came up: `ray start` times out on a loaded node) while
                # the driver still runs: start it again, so that the node rejoins the sweep.
                print(f"vgg-xai: the Ray worker on {ip} exited with {self._nodes[0].proc.returncode} "
                      f"(start {start} of {WORKER_STARTS}); the end of {log}:\n{self._nodes[0].log_tail()}",
                      file=sys.stderr, flush=True)
                self._stop_ray()
            raise RuntimeError(f"the Ray worker on {ip} exited {WORKER_STARTS} times; see {log}")
        finally:
            self._stop_ray()

    @staticmethod
    def _node_ip() -> str:
        """This node's address as the other nodes of the allocation reach it: the first address its
        hostname resolves to that is not loopback (Debian's /etc/hosts maps the hostname to 127.0.1.1)."""
        name = socket.gethostname()
        ips = [a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)]
        outward = [ip for ip in ips if not ip.startswith("127.")]
        if not outward:
            raise RuntimeError(f"{name} resolves only to loopback ({', '.join(ips)}); a multi-node Ray needs an "
                               "address the other nodes reach: fix the hostname's entry in /etc/hosts or DNS")
        return outward[0]

    def _stop_ray(self) -> None:
        """Disconnect the driver, then stop the Ray nodes this task started."""
        if "ray" in sys.modules:
            try:
                runtime.ray_shutdown()
            except Exception:  # noqa: BLE001 - the nodes must be stopped even if the driver is half gone
                pass
        for node in getattr(self, "_nodes", []):
            node.stop(timeout=20)
        self._nodes = []

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Stop Ray cleanly so that no Ray process outlives this allocation; the requeued job
        # resumes every unfinished trial from its last checkpoint.
        self._stop_ray()
        return submitit.helpers.DelayedSubmission(SweepJob(self.spec, self.data))


@dataclass
class TrialTask(submitit.helpers.Checkpointable):
    """One trial as one array task (no Ray); resumes from its checkpoint after a requeue."""

    trial_dir: str

    def __call__(self, config: dict[str, Any]) -> str:
        from .train import run_trial

        result = run_trial(TrialConfig.from_dict(config), self.trial_dir, resume=True)
        return result.status


@dataclass
class PostprocessJob:
    sweep_dir: str

    def __call__(self) -> str:
        from .postprocess import postprocess

        from .results import collect_rows

        rows = collect_rows(self.sweep_dir)
        if not any(r["status"] in TESTED for r in rows):
            statuses = sorted({r["status"] for r in rows})
            counts = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in statuses)
            raise RuntimeError(f"nothing to post-process in {self.sweep_dir}: no trial completed "
                               f"({counts or 'no trials'})"
                               f"; see `vgg-xai status {self.sweep_dir}`")
        summary = postprocess(self.sweep_dir)
        if summary.failed:  # the job shows FAILED, and `vgg-xai status` shows this line
            raise RuntimeError("interpretation failed: " + "; ".join(f"{t}: {e}" for t, e in summary.failed.items()))
        return self.sweep_dir


# ---------------------------------------------------------------------------- submit

def job_parameters(profile: ClusterProfile, spec: JobSpec, role: str, *, after: str | None = None,
                   tasks: int = 0, max_concurrent: int | None = None) -> dict[str, Any]:
    """What submit gives submitit's ``update_parameters`` for one job of a submission, from the cluster
    profile and the job spec alone (no SLURM is asked):

    - ``sweep`` (mode ray): the profile's nodes, each one task with its CPUs and GPUs (a Ray node each);
    - ``trial`` (mode array): the array of ``tasks`` trials, each one node with the whole CPUs and GPUs a
      trial asks for, at most ``max_concurrent`` of them at once (all, where None);
    - ``postprocess``: one node, the profile's CPUs, no GPU, after any outcome of job ``after``.
    """
    if role == "sweep":
        nodes, cpus, gpus = profile.nodes, profile.cpus_per_task, profile.gpus_per_node
    elif role == "trial":  # a task gets whole CPUs and GPUs
        nodes, cpus, gpus = 1, max(1, math.ceil(spec.cpu)), math.ceil(spec.gpu)
    elif role == "postprocess":
        nodes, cpus, gpus = 1, profile.cpus_per_task, 0
    else:
        raise ValueError(f"role {role!r} is not one of sweep, trial, postprocess")
    extra = dict(profile.extra_sbatch)
    if role == "postprocess":
        extra["dependency"] = f"afterany:{after}"  # whatever the sweep's outcome: never pending for ever
    params: dict[str, Any] = dict(
        name=f"vgg-xai-{spec.name}" + ("-post" if role == "postprocess" else ""), nodes=nodes, tasks_per_node=1,
        cpus_per_task=cpus, timeout_min=profile.time_min, slurm_signal_delay_s=profile.signal_delay_s,
        slurm_additional_parameters=extra,
        slurm_setup=[f"export {k}={json.dumps(v)}" for k, v in profile.env.items()] + list(profile.setup),
    )
    if gpus:
        params["gpus_per_node"] = gpus
    if profile.mem_gb:
        params["mem_gb"] = profile.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(profile, key):
            params[f"slurm_{key}"] = getattr(profile, key)
    if role == "trial":
        params["slurm_array_parallelism"] = max_concurrent or tasks
    return params


def _executor(folder: Path, params: dict[str, Any]) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    ex.update_parameters(**params)
    return ex


def submit(spec: JobSpec, profile: ClusterProfile, *, data: str | None = None, mode: str = "ray",
           max_concurrent: int | None = None, force_new: bool = False) -> dict[str, Any]:
    """Submit the sweep (or its array) and the post-processing job after it (after any outcome: it
    interprets what finished); returns what was submitted."""
    from . import sweep

    if mode not in ("ray", "array"):
        raise UserError(f"--mode: {mode!r} is not one of ray, array")
    check_profile(profile, spec, mode)
    sweep.check_inputs(spec, data=data, check_local=False)
    sweep_dir = sweep.sweep_dir_of(spec)
    active = active_jobs(sweep_dir)
    if active:
        raise UserError(f"{sweep_dir}: this sweep's SLURM jobs are still queued or running ({', '.join(active)}); "
                        f"wait for them (vgg-xai status {sweep_dir}) or stop them (vgg-xai cancel {sweep_dir})")
    with driving(sweep_dir):  # no local driver on it now, and none while the folder is prepared
        plan = sweep.plan(spec, data=data, force_new=force_new, check_local=False)
    folder = plan.sweep_dir / "slurm"
    jobs = []
    if mode == "ray":
        job = _executor(folder, job_parameters(profile, spec, "sweep")).submit(SweepJob(spec, str(plan.data)))
        jobs.append({"role": "sweep", "job_id": job.job_id})
        after = job.job_id
    else:
        pending = plan.pending()
        if not pending:
            raise UserError(f"{plan.sweep_dir}: every trial has finished; nothing to submit")
        params = job_parameters(profile, spec, "trial", tasks=len(pending), max_concurrent=max_concurrent)
        ex = _executor(folder, params)
        with ex.batch():
            array = [ex.submit(TrialTask(str(plan.trial_dir(t))), c.to_dict()) for t, c in pending]
        jobs += [{"role": "trial", "job_id": j.job_id, "trial_id": t} for j, (t, _) in zip(array, pending)]
        after = array[0].job_id.split("_")[0]
    pjob = _executor(folder, job_parameters(profile, spec, "postprocess", after=after)).submit(
        PostprocessJob(str(plan.sweep_dir)))
    jobs.append({"role": "postprocess", "job_id": pjob.job_id})
    add_submission(plan.sweep_dir, mode, jobs)
    return {"sweep_dir": str(plan.sweep_dir), "mode": mode, "jobs": jobs}


def active_jobs(sweep_dir: Path) -> list[str]:
    """'ID (STATE)' of every job ever submitted for the sweep that is still in the queue.

    Read from squeue, whose queue is exactly the jobs that are pending or running: sacct leaves out
    a job whose begin time is still ahead. By base id, since squeue shows an array's pending tasks
    as one line (12_[0-3]).
    """
    ids = {j["job_id"].split("_")[0] for record in read_jobs(sweep_dir) for j in record["jobs"]}
    if not ids:
        return []
    queue = _run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%T"])
    return [f"{jid} ({state})" for jid, state in (line.split("|", 1) for line in queue.splitlines() if "|" in line)
            if jid.split("_")[0] in ids]


def _latest_jobs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    record = read_jobs(Path(sweep_dir))
    if not record:
        raise UserError(f"{sweep_dir}: no SLURM jobs recorded; submit with `vgg-xai submit`")
    return record[-1]["jobs"]


# ---------------------------------------------------------------------------- status and cancel

def job_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """sacct's view of jobs: state, elapsed, nodes; squeue's pending reason."""
    out: dict[str, dict[str, str]] = {}
    text = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,Elapsed,NodeList", "-j", ",".join(job_ids)])
    for line in text.splitlines():
        jid, state, elapsed, nodes = line.split("|")
        out[jid] = {"state": state.split()[0], "elapsed": elapsed, "nodes": nodes, "reason": ""}
    queue = subprocess.run(["squeue", "-h", "-o", "%i|%r", "-j", ",".join(job_ids)], capture_output=True, text=True)
    for line in queue.stdout.splitlines():
        jid, reason = line.split("|", 1)
        if jid in out and reason not in ("None", ""):
            out[jid]["reason"] = reason
    return out


def jobs_view(sweep_dir: str | Path) -> tuple[list[str], bool]:
    """What `vgg-xai status` shows of a sweep's SLURM jobs: their lines (none for a sweep never
    submitted), and whether any of them is still queued or running. A damaged record is one line
    (the trials are read from their folders all the same)."""
    try:
        if not read_jobs(Path(sweep_dir)):
            return [], False
    except Damaged as e:
        return [f"SLURM jobs not read: {e}"], False
    return job_lines(sweep_dir), bool(active_jobs(Path(sweep_dir)))


def job_lines(sweep_dir: str | Path, tail: int = 15) -> list[str]:
    """Per job of the latest submission: id, role, state, elapsed, nodes, pending reason; a failed
    job's stderr tail (`vgg-xai status` shows them above its trials)."""
    sweep_dir = Path(sweep_dir)
    jobs = _latest_jobs(sweep_dir)
    states = job_states([j["job_id"] for j in jobs])
    lines = [f"{'job':<14} {'role':<12} {'state':<11} {'elapsed':<10} {'nodes':<12} reason"]
    for j in jobs:
        s = states.get(j["job_id"], {"state": "UNKNOWN", "elapsed": "", "nodes": "", "reason": ""})
        role = j["role"] + (f" {j['trial_id']}" if "trial_id" in j else "")
        lines.append(f"{j['job_id']:<14} {role:<12} {s['state']:<11} {s['elapsed']:<10} {s['nodes']:<12} "
                     f"{s['reason']}".rstrip())
        if s["state"] in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
            err = _stderr(sweep_dir, j["job_id"])
            if err:
                lines.append(f"  stderr of {j['job_id']} (last {tail} lines):")
                lines += ["    " + x for x in err.splitlines()[-tail:]]
    return lines


def _stderr(sweep_dir: Path, job_id: str) -> str:
    base = job_id.split("_")[0]
    for path in sorted((sweep_dir / "slurm").glob(f"{base}*/{job_id}_*_log.err")):
        return path.read_text(errors="replace")
    return ""


def cancel(sweep_dir: str | Path) -> list[str]:
    """Cancel the sweep's latest jobs (scancel through submitit); returns their ids."""
    sweep_dir = Path(sweep_dir)
    ids = [j["job_id"] for j in _latest_jobs(sweep_dir)]
    for jid in ids:
        submitit.SlurmJob(folder=sweep_dir / "slurm" / jid.split("_")[0], job_id=jid).cancel(check=False)
    return ids

