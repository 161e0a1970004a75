"""Ray Tune: a job spec's grid -> a Tuner -> run_trial. Every Ray call lives in this module.

Trial folders are ours and stable (``results/<sweep>/trials/<trial_id>/``); Ray keeps its own
state under ``results/<sweep>/ray/``. A trial resumes from the checkpoint.pt in its folder, so
a retry after a crash, a rerun after the driver was stopped and a SLURM requeue all continue
where the trial stopped. A finished trial (result.json) is never run again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from .checkpoint import atomic_write_text
from .config import JobSpec, TrialConfig
from .errors import DiskFull, UserError

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
    changes: list[str] = field(default_factory=list)  # how the spec differs from the one this sweep started with
    warnings: list[str] = field(default_factory=list)  # what this machine could not run (dry run only)

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


def _identity(resolved: dict[str, Any]) -> dict[str, Any]:
    """What must stay the same for a sweep to continue: the spec, and its data by content digest.

    The path or archive that named the data is not part of it: the same images prepared from an
    archive on a laptop and handed to a SLURM job as the prepared .h5 are the same sweep. A digest
    not known (a dry run before the data was prepared, a sweep started by an older version) is not
    compared.
    """
    data = {k: v for k, v in resolved["data"].items() if k not in ("source", "cache")}
    if data.get("content_sha256") is None:
        data.pop("content_sha256", None)
    return {**resolved, "data": data}


def sweep_dir_of(spec: JobSpec) -> Path:
    return Path(spec.results).absolute() / spec.name


# ---------------------------------------------------------------------------- one driver per sweep

def _lock_path(sweep_dir: Path) -> Path:
    # Beside the sweep folder, not in it: --force-new moves the folder aside while the lock is held.
    return sweep_dir.parent / f".{sweep_dir.name}.driver"


def _holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _describe_holder(h: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"])) if "since" in h else "?"
    return f"PID {h.get('pid', '?')} on {h.get('host', '?')}, since {since}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def driving(sweep_dir: Path) -> Iterator[None]:
    """Hold the sweep folder's driver lock for the block: one driver per sweep, on any host.

    The lock is a flock, which the kernel drops when the driver dies however it dies, so a dead
    driver's lock is free at once; its file names the holder (host, PID, start) for the refusal.
    Where the file system has no flock (ENOLCK), the record alone decides: a holder on this host
    whose PID is gone is stale and taken over.
    """
    path = _lock_path(Path(sweep_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{sweep_dir}: another driver is running this sweep ({_describe_holder(_holder(path))}); "
                            "wait for it to finish or stop it, then run the same command again") from None
        except OSError as e:
            if e.errno != errno.ENOLCK:
                raise
            h = _holder(path)
            stale = not h or (h.get("host") == me["host"] and not _pid_alive(int(h.get("pid", 0))))
            if not stale and h.get("pid") != me["pid"]:
                raise UserError(f"{sweep_dir}: another driver is running this sweep ({_describe_holder(h)}); wait for "
                                f"it, or delete {path} if that driver is gone") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the flock


def check_inputs(spec: JobSpec, *, data: str | Path | None = None, check_local: bool = True,
                 dry_run: bool = False, address: str | None = None) -> tuple[Path | None, Path, list[str]]:
    """Every check of a sweep's input that needs no writing: (data source or None, cache, what this
    machine lacks). Bad input raises UserError; what the machine lacks (``check_local``: the
    resources and device a trial asks for) raises too, unless ``dry_run``. An ``address`` must
    answer."""
    from .data import DEFAULT_CACHE, source_kind

    if address:
        check_address(address)
    results = Path(spec.results)
    if results.exists() and not results.is_dir():
        raise UserError(f"results: {results} is a file; name a folder for the sweep's results (--results)")

    lacking = _machine_problems(spec) if check_local else []
    if lacking and not dry_run:
        raise UserError(lacking[0])
    source = data if data is not None else spec.data.get("source")
    key = "--data" if data is not None else "data.source"
    cache = Path(spec.data.get("cache") or Path(spec.results, DEFAULT_CACHE.relative_to("results"))).absolute()
    if source is None:
        return None, cache, lacking
    if Path(source).suffix in (".h5", ".hdf5"):
        if not Path(source).is_file():
            raise UserError(f"{key}: {source}: no such file or folder; pass a prepared cache (.h5) or a CIFAR-10 "
                            "source")
        _check_subsets(spec, Path(source))
        return None, Path(source).absolute(), lacking
    try:
        source_kind(Path(source))
    except UserError as e:
        raise UserError(f"{key}: {e}") from None
    return Path(source), cache, lacking


def _check_subsets(spec: JobSpec, cache: Path) -> None:
    """Every trial's subsets against what the prepared cache holds, before any trial starts."""
    from .data import check_subsets, split_sizes

    sizes = split_sizes(cache)
    for _, c in spec.trials(""):
        check_subsets({"train": c.train_size, "valid": c.valid_size, "test": c.test_size}, sizes, cache)


def plan(spec: JobSpec, *, data: str | Path | None = None, force_new: bool = False, dry_run: bool = False,
         check_local: bool = True) -> Plan:
    """Resolve data and folders, check the spec against an earlier run of the same sweep.

    Nothing is trained here, and every check a user's input can fail happens here, before Ray
    starts. The driver prepares the data cache once (trials read it by absolute path) and checks
    its content against the digest stored when it was prepared. With ``check_local`` the resources
    and device a trial asks for are checked against this machine (else against the Ray cluster,
    once joined). Hold ``driving(sweep_dir_of(spec))`` around it when it is not a dry run.

    ``dry_run``: prepare nothing and write nothing; what a real run would refuse is in
    ``changes``, and what this machine could not run is in ``warnings`` instead of an error.
    """
    from .data import cached_identity, prepare, verify_cache

    source, cache, warnings = check_inputs(spec, data=data, check_local=check_local, dry_run=dry_run)
    sweep_dir = sweep_dir_of(spec)
    if dry_run:
        digest = cached_identity(source, cache)
    else:
        if source is not None or not cache.is_file():
            cache = prepare(source, cache, split_seed=int(spec.data.get("split_seed", 0)))
        digest = verify_cache(cache)
    if digest is not None:
        _check_subsets(spec, cache)
    resolved = {**spec.to_dict(), "data": {**spec.data, "source": str(source) if source else None,
                                           "cache": str(cache), "content_sha256": digest}}
    saved = sweep_dir / "spec.yaml"
    changes = []
    if saved.is_file():
        changes = _diff(_identity(yaml.safe_load(saved.read_text())), _identity(resolved))
    if changes and not dry_run:
        if not force_new:
            raise UserError(f"{sweep_dir}: the spec changed since this sweep started ({'; '.join(changes[:4])}); "
                            "run it under another name, or pass --force-new to start over (the old folder is kept)")
        aside = sweep_dir.with_name(f"{sweep_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(sweep_dir), aside)
        print(f"started over: the earlier sweep was moved to {aside}", file=sys.stderr)
    p = Plan(spec, sweep_dir, cache, spec.trials(str(cache)), changes, warnings)
    if not dry_run:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, yaml.safe_dump(resolved, sort_keys=True))
        for tid, cfg in p.trials:  # every trial has a folder from the start: tables list the ones never run
            if not (p.trial_dir(tid) / "config.json").is_file():
                atomic_write_text(p.trial_dir(tid) / "config.json", cfg.to_json())
    return p


def _machine_problems(spec: JobSpec) -> list[str]:
    """What a trial asks of the machine it runs on that this machine lacks, one line each."""
    import torch

    out = resource_problems(spec, os.cpu_count() or 1, torch.cuda.device_count(), "this machine")
    if not torch.cuda.is_available() and any(c.device == "cuda" for _, c in spec.trials("")):
        out.append("device: cuda was asked for but torch sees no GPU here; set training.device: auto or cpu, "
                   "or run where there are GPUs")
    return out


def resource_problems(spec: JobSpec, cpus: float, gpus: float, where: str) -> list[str]:
    out = []
    if spec.cpu > cpus:
        out.append(f"resources.cpu: {spec.cpu:g} per trial, but {where} has {cpus:g} CPUs; lower it")
    if spec.gpu > gpus:
        out.append(f"resources.gpu: {spec.gpu:g} per trial, but {where} has {gpus:g} GPUs; "
                   "set resources.gpu: 0 or run where there are GPUs")
    return out


def describe(p: Plan) -> str:
    """The --dry-run text: every trial, its status and its resources."""
    lines = [f"sweep {p.spec.name}: {len(p.trials)} trials, {p.spec.cpu:g} CPU and {p.spec.gpu:g} GPU each, "
             f"retries {p.spec.retries}", f"results: {p.sweep_dir}", f"data: {p.data}"]
    done = "finished under the earlier spec" if p.changes else "finished"
    for tid, cfg in p.trials:
        status = done if _finished(p.trial_dir(tid)) else "to run"
        lines.append(f"  {tid:<36} {cfg.arch} width {cfg.width:g} {cfg.head} epochs {cfg.epochs}  [{status}]")
    return "\n".join(lines)


def dry_run_warnings(p: Plan) -> list[str]:
    """What a dry run warns of: a real run that would be refused, resources this machine lacks."""
    out = [f"a real run would be refused: the spec changed since this sweep started ({'; '.join(p.changes[:4])}); "
           "run it under another name, or pass --force-new to start over"] if p.changes else []
    return out + [f"this machine could not run it: {w}" for w in p.warnings]


# ---------------------------------------------------------------------------- the Ray side

def _trainable(config: dict[str, Any]) -> None:
    """Ray's view of a trial: run_trial in the stable folder, reporting each epoch to Tune."""
    config = config["trial"]
    import torch
    from ray import tune

    from .train import run_trial

    torch.set_num_threads(max(1, int(config["cpus"])))
    import ray

    os.environ["VGG_XAI_NODE"] = ray.util.get_node_ip_address()  # recorded in attempts.jsonl, with
    os.environ["VGG_XAI_RAY"] = ray.get_runtime_context().gcs_address  # the Ray cluster that ran it
    out = Path(config["trial_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "error.txt").unlink(missing_ok=True)
    cfg = TrialConfig.from_dict(config["config"])
    result = run_trial(cfg, out, report=lambda metrics, _ckpt: tune.report(metrics), resume=True)
    tune.report({"done_status": result.status, "test_acc": result.test_acc, "epoch": result.epochs_completed})


_reaper: subprocess.Popen | None = None  # the watcher of the embedded Ray this process started


def ray_init(address: str | None = None, num_cpus: float | None = None, num_gpus: float | None = None) -> bool:
    """Start Ray in this process on 127.0.0.1, or join ``address``; True when this call started it.

    An embedded Ray is this driver's alone: its own temp folder (sockets, session, logs) under
    $RAY_TMPDIR or /tmp, its own ports, no dashboard, and a watcher (vgg_xai.reaper) that stops
    whatever of it would outlive the driver. Stop it with ``ray_shutdown``.
    """
    global _reaper
    if not address:
        # A one-node Ray on loopback: Ray maps 127.0.0.1 to the machine's outward address unless
        # multi-node support is off (Ray's own setting on macOS and Windows). Read at import.
        os.environ.setdefault(_ONE_NODE, "0")
    import ray

    if ray.is_initialized():
        return False
    if address:
        check_address(address)
        try:
            ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
        except ConnectionError as e:
            raise UserError(f"--address {address}: {str(e).splitlines()[0]}; start the cluster (ray start --head) "
                            "or leave --address out to run on this machine") from None
        return True
    # Short: Ray's AF_UNIX socket paths under it must stay below 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="vgg-xai-ray-", dir=os.environ.get("RAY_TMPDIR") or "/tmp")
    try:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", _temp_dir=temp_dir, configure_logging=False, log_to_driver=False)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    _reaper = subprocess.Popen([sys.executable, "-m", "vgg_xai.reaper", str(raylet), temp_dir],
                               stdin=subprocess.PIPE, start_new_session=True)
    return True


ADDRESS_TIMEOUT_S = 30  # how long a cluster's head may take to answer before --address is refused


def check_address(address: str, timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """Refuse, in one line, an --address that is not HOST:PORT or 'auto', or where nothing answers
    within ``timeout`` seconds (ray.init would wait there for ever). 'auto' is checked where
    RAY_ADDRESS names the cluster; else Ray finds a local one itself, or says there is none."""
    target = os.environ.get("RAY_ADDRESS") if address == "auto" else address
    if not target or target == "auto":
        return
    host, _, port = target.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address: {target!r} is not HOST:PORT or 'auto'")
    end = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() > end:
                raise UserError(f"--address {target}: nothing answers there within {timeout:.0f} s ({e.strerror or e}); "
                                "start the cluster (ray start --head) or leave --address out") from None
            time.sleep(1)


def ray_shutdown() -> None:
    """Disconnect from Ray; an embedded Ray is stopped, and its watcher cleans up after it."""
    global _reaper
    import ray

    ray.shutdown()
    if _reaper is not None:
        _reaper.stdin.close()  # the watcher's signal to finish
        _reaper.wait()
        _reaper = None


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

    # Tune logs each failed attempt's traceback and the list of failed trials; the table shows the
    # failures, error.txt keeps each one, and the summary after the sweep names them.
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        res = ray.cluster_resources()
        problems = resource_problems(p.spec, res.get("CPU", 0), res.get("GPU", 0), "the Ray cluster")
        if problems:
            raise UserError(problems[0])
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
        full: DiskFull | None = None
        for r in tuner.fit():
            trial_dir = p.trial_dir(Path(r.path).name)  # Ray's trial folder is named by our trial id
            if r.error is None or _finished(trial_dir):
                continue
            cause = _user_error(r.error)
            if isinstance(cause, DiskFull):  # not the trial's fault: the trial goes on from its checkpoint
                full = full or cause
                continue
            try:
                atomic_write_text(trial_dir / "error.txt", f"{type(cause or r.error).__name__}: {cause or r.error}\n")
            except DiskFull as e:
                full = full or e
        if table.tty:
            print(file=stream)
        if full is not None:  # the rerun after space is freed continues every trial from its checkpoint
            raise full
    finally:
        if started:
            ray_shutdown()


def _user_error(err: BaseException) -> UserError | None:
    """The UserError (one line for the user) a trial's error from Ray carries, if any: Ray wraps
    the trial's exception, as its ``cause`` or as the chained exception."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None)  # Ray's wrapper (itself made an instance of the cause's class)
        if isinstance(inner, BaseException):
            err = inner
        elif isinstance(err, UserError):
            return err
        else:
            err = err.__cause__
    return None


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
            ray_shutdown()
