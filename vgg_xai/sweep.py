"""Ray Tune: a job spec's grid -> a Tuner -> run_trial. Every Ray call lives in this module.

Trial folders are ours and stable (``results/<sweep>/trials/<trial_id>/``); Ray keeps its own
state under ``results/<sweep>/ray/``. A trial resumes from the checkpoint.pt in its folder, so
a retry after a crash, a rerun after the driver was stopped and a SLURM requeue all continue
where the trial stopped. A finished trial (result.json) is never run again.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .checkpoint import atomic_write_text
from .config import JobSpec, TrialConfig
from .errors import UserError

# Never phone home; must be set before ray is imported anywhere in this process.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Tune's own console output: off; the live table below says what a user needs.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

FINISHED = ("completed", "diverged")
_ONE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass
class Plan:
    spec: JobSpec
    sweep_dir: Path
    data: Path
    trials: list[tuple[str, TrialConfig]]  # every trial of the grid

    def trial_dir(self, trial_id: str) -> Path:
        return self.sweep_dir / "trials" / trial_id

    def pending(self) -> list[tuple[str, TrialConfig]]:
        return [(t, c) for t, c in self.trials if not _finished(self.trial_dir(t))]


def _finished(trial_dir: Path) -> bool:
    result = trial_dir / "result.json"
    return result.is_file() and json.loads(result.read_text()).get("status") in FINISHED


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def plan(spec: JobSpec, *, data: str | Path | None = None, force_new: bool = False,
         prepare_data: bool = True, check_local: bool = True) -> Plan:
    """Resolve data and folders, check the spec against an earlier run of the same sweep.

    Nothing is trained here. With ``prepare_data`` the driver prepares the data cache once, so
    that trials read it by absolute path. With ``check_local`` the resources a trial asks for
    are checked against this machine (else against the Ray cluster, once joined).
    """
    from .data import DEFAULT_CACHE, prepare

    if check_local:
        import torch

        check_resources(spec, os.cpu_count() or 1, torch.cuda.device_count(), "this machine")
    results = Path(spec.results).absolute()
    sweep_dir = results / spec.name
    source = data if data is not None else spec.data.get("source")
    cache = Path(spec.data.get("cache") or results / DEFAULT_CACHE.relative_to("results")).absolute()
    if source is not None and Path(source).suffix in (".h5", ".hdf5") and Path(source).is_file():
        cache, source = Path(source).absolute(), None
    if prepare_data and (source is not None or not cache.is_file()):
        cache = prepare(source, cache, split_seed=int(spec.data.get("split_seed", 0)))
    resolved = {**spec.to_dict(), "data": {**spec.data, "source": str(source) if source else None,
                                           "cache": str(cache)}}
    saved = sweep_dir / "spec.yaml"
    if saved.is_file() and prepare_data:
        old = yaml.safe_load(saved.read_text())
        changes = _diff(old, resolved)
        if changes and not force_new:
            raise UserError(f"{sweep_dir}: the spec changed since this sweep started ({'; '.join(changes[:4])}); "
                            "run it under another name, or pass --force-new to start over (the old folder is kept)")
        if changes:
            aside = sweep_dir.with_name(f"{sweep_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(str(sweep_dir), aside)
            print(f"started over: the earlier sweep was moved to {aside}", file=sys.stderr)
    if prepare_data:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, yaml.safe_dump(resolved, sort_keys=True))
    return Plan(spec, sweep_dir, cache, spec.trials(str(cache)))


def check_resources(spec: JobSpec, cpus: float, gpus: float, where: str) -> None:
    if spec.cpu > cpus:
        raise UserError(f"resources.cpu: {spec.cpu:g} per trial, but {where} has {cpus:g} CPUs; lower it")
    if spec.gpu > gpus:
        raise UserError(f"resources.gpu: {spec.gpu:g} per trial, but {where} has {gpus:g} GPUs; "
                        "set resources.gpu: 0 or run where there are GPUs")


def describe(p: Plan) -> str:
    """The --dry-run text: every trial, its status and its resources."""
    lines = [f"sweep {p.spec.name}: {len(p.trials)} trials, {p.spec.cpu:g} CPU and {p.spec.gpu:g} GPU each, "
             f"retries {p.spec.retries}", f"results: {p.sweep_dir}", f"data: {p.data}"]
    for tid, cfg in p.trials:
        status = "finished" if _finished(p.trial_dir(tid)) else "to run"
        lines.append(f"  {tid:<36} {cfg.arch} width {cfg.width:g} {cfg.head} epochs {cfg.epochs}  [{status}]")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the Ray side

def _trainable(config: dict[str, Any]) -> None:
    """Ray's view of a trial: run_trial in the stable folder, reporting each epoch to Tune."""
    config = config["trial"]
    import torch
    from ray import tune

    from .train import run_trial

    torch.set_num_threads(max(1, int(config["cpus"])))
    import ray

    os.environ["VGG_XAI_NODE"] = ray.util.get_node_ip_address()  # recorded in attempts.jsonl
    out = Path(config["trial_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "error.txt").unlink(missing_ok=True)
    cfg = TrialConfig.from_dict(config["config"])
    result = run_trial(cfg, out, report=lambda metrics, _ckpt: tune.report(metrics), resume=True)
    tune.report({"done_status": result.status, "test_acc": result.test_acc, "epoch": result.epochs_completed})


def ray_init(address: str | None = None, num_cpus: float | None = None, num_gpus: float | None = None) -> bool:
    """Start Ray in this process on 127.0.0.1, or join ``address``; True when this call started it."""
    if not address:
        # A one-node Ray on loopback: Ray maps 127.0.0.1 to the machine's outward address unless
        # multi-node support is off (Ray's own setting on macOS and Windows). Read at import.
        os.environ.setdefault(_ONE_NODE, "0")
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
        return True
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
             _node_ip_address="127.0.0.1", configure_logging=False, log_to_driver=False)
    return True


# ---------------------------------------------------------------------------- several Ray nodes
#
# The multi-node sweep job starts a head (`start_head`) and workers (`start_worker`) with `ray start`,
# then connects its driver (`wait_for_nodes`) and runs the same Tune driver as one node does.
#
# One machine can stand in for several nodes: Ray refuses a multi-node cluster on 127.0.0.1, so the
# nodes take other loopback addresses, the head 127.0.0.2 and a worker 127.0.0.3 (tests do this).
# Linux routes all of 127.0.0.0/8 to lo, so these aliases work without any configuration (macOS
# routes only 127.0.0.1 and would need `ifconfig lo0 alias 127.0.0.2`).
#
# Ray 2.60 authenticates every connection to a cluster with a token, and reads the mode and the
# token once a process: a head turns token mode on by itself when ~/.ray/auth_token exists, a worker
# or a driver does not, and a process that already used Ray (an embedded Ray turns token mode on
# with ~/.ray/auth_token) keeps sending the token it read first. So every `ray start` and the
# driver are given the mode and one token file explicitly.
_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@dataclass
class RayNode:
    """A Ray node started with `ray start --block` by this process (head or worker)."""

    proc: subprocess.Popen
    address: str  # the GCS address of the cluster
    log: Path

    def log_tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM: `ray start --block` drains the node and stops the processes it started. Whatever
        is left of its process group after that (or after ``timeout``) is killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # `ray start` leads its own process group (start_new_session): Ray's daemons are in it
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def _ray_start(args: list[str], log: Path, token: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    # Not the one-node setting of an embedded Ray (these nodes form a multi-node cluster), nor a
    # token this process may have been given for another cluster; unbuffered, so that the log shows
    # how far a node got even when it is killed.
    env = {k: v for k, v in os.environ.items() if k != _ONE_NODE and k not in _AUTH_VARS}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(Path(token).absolute()), PYTHONUNBUFFERED="1")
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
                                 "--disable-usage-stats", *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def start_head(ip: str, cpus: float, gpus: float, log: Path, *, token: Path, temp_dir: str | None = None) -> RayNode:
    """A Ray head on ``ip`` with explicit resources and free ports (no clash with other jobs).

    ``token``: the cluster's token file, made here (readable by this user only) when missing; every
    worker and the driver get the same file. ``temp_dir``: Ray's session folder for every node on this
    machine (its AF_UNIX socket paths must stay under 108 bytes: keep it short).
    """
    token = Path(token)
    if not token.is_file():
        token.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    port = free_port(ip)
    args = ["--head", f"--node-ip-address={ip}", f"--port={port}", f"--num-cpus={cpus:g}", f"--num-gpus={gpus:g}",
            "--include-dashboard=false", f"--dashboard-agent-listen-port={free_port(ip)}"]
    if temp_dir:
        args.append(f"--temp-dir={temp_dir}")
    return RayNode(_ray_start(args, log, token), f"{ip}:{port}", log)


def start_worker(address: str, ip: str, cpus: float, gpus: float, log: Path, *, token: Path) -> RayNode:
    """A Ray worker node on ``ip`` joining the head at ``address`` (``token``: the head's token file)."""
    args = [f"--address={address}", f"--node-ip-address={ip}", f"--num-cpus={cpus:g}", f"--num-gpus={gpus:g}",
            f"--dashboard-agent-listen-port={free_port(ip)}"]
    return RayNode(_ray_start(args, log, token), address, log)


def wait_for_nodes(address: str, n: int, node_ip: str, *, token: Path, timeout: float = 120,
                   nodes: list[RayNode] | tuple[RayNode, ...] = ()) -> None:
    """Connect this process as the driver and wait until ``n`` nodes are alive.

    Raises after ``timeout`` seconds, at once when one of ``nodes`` (the `ray start` processes
    this process started) exits, and at once when the cluster refuses the token.
    """
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(Path(token).absolute()))
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the file
    imported = "ray" in sys.modules
    import ray

    if ray.is_initialized():
        raise RuntimeError("this process is already connected to Ray; call ray.shutdown() before joining "
                           f"the cluster at {address}")
    if imported:  # Ray read the mode and cached a token already: make it read them again, as Ray itself does
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    host, port = address.rsplit(":", 1)
    end = time.monotonic() + timeout
    last: str = "the head did not answer"

    def check() -> None:
        for node in nodes:
            if node.proc.poll() is not None:
                raise RuntimeError(f"`ray start` for {address} exited with {node.proc.returncode}; "
                                   f"the end of {node.log}:\n{node.log_tail()}")
        if time.monotonic() > end:
            logs = "".join(f"\nthe end of {node.log}:\n{node.log_tail()}" for node in nodes)
            raise TimeoutError(f"Ray at {address}: fewer than {n} nodes joined within {timeout:.0f} s "
                               f"({last}){logs}")

    while True:  # first the head's port: ray.init would block on a head that is not up yet
        check()
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError as e:
            last = f"{address}: {e}"
            time.sleep(0.2)
    while True:
        check()
        try:
            if not ray.is_initialized():
                ray.init(address=address, _node_ip_address=node_ip, include_dashboard=False,
                         configure_logging=False, log_to_driver=False)
            alive = sum(1 for node in ray.nodes() if node["Alive"])
            if alive >= n:
                return
            last = f"{alive} alive"
        except (ConnectionError, RuntimeError) as e:
            if "InvalidAuthToken" in str(e) or "InvalidAuthToken" in str(e.__cause__):
                raise RuntimeError(f"Ray at {address} refused this process's token ({token}): {e}") from e
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.5)


class LiveTable:
    """Per-trial progress: redrawn in place on a terminal, one line per event otherwise."""

    def __init__(self, trials: list[tuple[str, TrialConfig]], stream=None):
        self.cfg = dict(trials)
        self.rows: dict[str, dict[str, Any]] = {t: {"status": "pending", "epoch": 0} for t in self.cfg}
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._drawn = 0

    def update(self, trial_id: str, **fields: Any) -> None:
        row = self.rows.setdefault(trial_id, {"status": "pending", "epoch": 0})
        row.update(fields)
        if "seconds" in fields:
            row.setdefault("epoch_s", []).append(fields["seconds"])
        if self.tty:
            self._redraw()
        else:
            print(self._line(trial_id), file=self.stream, flush=True)

    def _eta(self, tid: str) -> str:
        r = self.rows[tid]
        if not r.get("epoch_s") or r["status"] != "running":
            return ""
        left = (self.cfg[tid].epochs - r["epoch"]) * sum(r["epoch_s"]) / len(r["epoch_s"])
        return f"{left:.0f}s"

    def _cells(self, tid: str) -> list[str]:
        r = self.rows[tid]
        pct = lambda k: f"{r[k]:.3f}" if isinstance(r.get(k), float) and math.isfinite(r[k]) else ""  # noqa: E731
        ips = f"{r['images_per_s']:.0f}" if r.get("images_per_s") else ""
        return [tid, r["status"], f"{r['epoch']}/{self.cfg[tid].epochs}" if tid in self.cfg else str(r["epoch"]),
                pct("train_acc"), pct("valid_acc"), ips, self._eta(tid)]

    def _line(self, tid: str) -> str:
        c = self._cells(tid)
        parts = [c[0], c[1], f"epoch {c[2]}"] + [f"{label} {v}" for label, v in
                                                 (("train", c[3]), ("valid", c[4]), ("img/s", c[5]), ("eta", c[6])) if v]
        return "  ".join(parts)

    def render(self) -> str:
        head = ["trial", "status", "epoch", "train_acc", "valid_acc", "img/s", "eta"]
        body = [self._cells(t) for t in self.rows]
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in [head] + body)

    def _redraw(self) -> None:
        text = self.render()
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
        self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn = text.count("\n") + 1


def _callback(table: LiveTable):
    from ray.tune import Callback

    class _Progress(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            table.update(trial.config["trial"]["trial_id"], status="running")

        def on_trial_recover(self, iteration, trials, trial, **info):
            table.update(trial.config["trial"]["trial_id"], status="retrying")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "done_status" in result:
                table.update(trial.config["trial"]["trial_id"], status=result["done_status"])
            else:
                table.update(trial.config["trial"]["trial_id"], status="running",
                             **{k: result[k] for k in ("epoch", "train_acc", "valid_acc", "images_per_s", "seconds")})

        def on_trial_error(self, iteration, trials, trial, **info):
            table.update(trial.config["trial"]["trial_id"], status="failed")

    return _Progress()


@dataclass
class Outcome:
    pivot: dict[str, Any]
    failed: list[str]  # errored after all retries
    unfinished: list[str]  # not run to the end (the driver was stopped)


def run(p: Plan, *, address: str | None = None, stream=None) -> Outcome:
    """Run the plan's unfinished trials on Ray, then write and print the tables."""
    from .postprocess import postprocess
    from .results import format_pivot

    stream = stream or sys.stdout
    pending = p.pending()
    done = len(p.trials) - len(pending)
    print(f"sweep {p.spec.name}: {len(pending)} trials to run, {done} finished earlier; results in {p.sweep_dir}",
          file=stream, flush=True)
    if pending:
        _fit(p, pending, address, stream)
    post = postprocess(p.sweep_dir, address=address)
    pv = post.pivot
    failed = [t for t, _ in p.trials if (p.trial_dir(t) / "error.txt").is_file()]
    unfinished = [t for t, _ in p.pending() if t not in failed]
    print(f"\n{format_pivot(pv)}\n\ntables: {p.sweep_dir / 'tables'}\nreport: {post.report}", file=stream, flush=True)
    if post.failed:
        print(f"interpretation failed for {', '.join(post.failed)} (see trials/<id>/interpret/error.txt)",
              file=stream, flush=True)
    if failed:
        print(f"failed after {p.spec.retries} retries: {', '.join(failed)} (see trials/<id>/error.txt)",
              file=stream, flush=True)
    if unfinished:
        print(f"stopped with {len(unfinished)} trials unfinished; run the same command again to continue",
              file=stream, flush=True)
    return Outcome(pv, failed, unfinished)


def _fit(p: Plan, pending: list[tuple[str, TrialConfig]], address: str | None, stream) -> None:
    started = ray_init(address)  # first: it sets what Ray reads at import
    import ray
    from ray import tune

    try:
        res = ray.cluster_resources()
        check_resources(p.spec, res.get("CPU", 0), res.get("GPU", 0), "the Ray cluster")
        table = LiveTable(pending, stream)
        space = [{"trial_id": t, "trial_dir": str(p.trial_dir(t)), "config": c.to_dict(), "cpus": p.spec.cpu}
                 for t, c in pending]
        name_of: Callable[[Any], str] = lambda trial: trial.config["trial"]["trial_id"]  # noqa: E731
        tuner = tune.Tuner(
            tune.with_resources(_trainable, {"cpu": p.spec.cpu, "gpu": p.spec.gpu}),
            param_space={"trial": tune.grid_search(space)},
            tune_config=tune.TuneConfig(trial_name_creator=name_of, trial_dirname_creator=name_of,
                                        reuse_actors=True),  # no new worker (and torch import) per trial
            run_config=tune.RunConfig(
                name=f"run-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(p.sweep_dir / "ray"),
                failure_config=tune.FailureConfig(max_failures=p.spec.retries), verbose=0,
                callbacks=[_callback(table)],
            ),
        )
        for r in tuner.fit():
            trial_dir = p.trial_dir(Path(r.path).name)  # Ray's trial folder is named by our trial id
            if r.error is not None and not _finished(trial_dir):
                atomic_write_text(trial_dir / "error.txt", f"{type(r.error).__name__}: {r.error}\n")
        if table.tty:
            print(file=stream)
    finally:
        if started:
            ray.shutdown()


def map_tasks(fn: Callable[..., Any], calls: list[tuple], workers: int, address: str | None = None):
    """Yield ``fn(*args)`` for every args tuple in ``calls``, as they finish: on Ray tasks (one CPU
    each, at most ``workers`` at once) when there is more than one worker or an ``address``; in
    this process otherwise, which saves a Ray start for a single call."""
    if not calls:
        return
    if workers <= 1 and not address:
        for args in calls:
            yield fn(*args)
        return
    started = ray_init(address, num_cpus=None if address else workers)
    import ray

    try:
        task = ray.remote(num_cpus=1, max_retries=0)(fn)
        waiting = [task.remote(*args) for args in calls]
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            yield ray.get(ready[0])
    finally:
        if started:
            ray.shutdown()
