"""The Ray runtime: every Ray call of the project goes through this module.

- an embedded Ray for one command (``ray_init``/``ray_shutdown``) or a running cluster joined
  with ``--address``;
- the nodes of a multi-node SLURM job (``start_head``, ``start_worker``, ``wait_for_nodes``);
- a grid of trials on Ray Tune (``tune_grid``), and one call a task (``map_tasks``).

The rest of the project imports no Ray: planning a sweep, training, post-processing and the
views know nothing of Ray but what these functions take and give.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import UserError

# Never phone home; must be set before ray is imported anywhere in this process.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Tune's own console output: off; the sweep's live view says what a user needs.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Ctrl-C is the command's to handle: Tune's handler would finish the run, advise Tuner.restore and
# leave the command to go on to post-processing.
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")

_ONE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

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
        # Token authentication, as Ray does by default for a new local cluster, but asked for by
        # name: Ray then starts it without its "Token authentication is enabled" warning.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        return False
    if address:
        check_address(address)
        # Ray turns token mode on by itself where it finds a token, and says so on stderr each time;
        # the same, asked for by name, is quiet.
        if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or Path(
                os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").is_file()):
            os.environ["RAY_AUTH_MODE"] = "token"
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
                raise UserError(f"--address {target}: nothing answers there within {timeout:.0f} s "
                                f"({e.strerror or e}); "
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


def user_error(err: BaseException) -> UserError | None:
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


_COLOUR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour codes Ray puts in its errors' text


def error_text(err: BaseException) -> str:
    """A trial's error as plain text for its error.txt: the trial's own exception on the first line,
    then its traceback, ending in that exception again (the line the tables quote).

    Ray wraps the trial's exception (``RayTaskError(RuntimeError): ray::ImplicitFunc.train() (pid=...)``
    in terminal colours, then the traceback); the wrapper and the colours go, the trial's part stays.
    """
    cause, seen = err, set()
    while isinstance(getattr(cause, "cause", None), BaseException) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.cause
    cause_text = _COLOUR.sub("", str(cause)).strip()
    head = f"{type(cause).__name__}: {cause_text}" if cause_text else type(cause).__name__
    if cause is not err:  # through Ray: the traceback is the text Ray made of the remote one
        tb = _COLOUR.sub("", str(err)).strip().splitlines()
        if tb and tb[0].startswith("ray::"):  # Ray's stand-in for the traceback's header
            tb[0] = "Traceback (most recent call last):"
    elif err.__traceback__ is not None:
        tb = "".join(traceback.format_exception(err)).strip().splitlines()
    else:
        tb = []
    if len(tb) < 2:  # no frames: the exception alone
        return head + "\n"
    return "\n".join([head, "", tb[0], *_trial_frames(tb[1:])]) + "\n"


def _trial_frames(lines: list[str]) -> list[str]:
    """A traceback's lines after its header, from the trial's own first frame: Ray's frames that call
    the trial are left out, and so are the caret lines whose source line Ray left out before."""
    frames: list[list[str]] = []
    rest: list[str] = []
    for line in lines:
        if not rest and line.startswith('  File "'):
            frames.append([line])
        elif not rest and line.startswith("    "):
            caret = not line.strip(" ^~")
            if frames and (not caret or (len(frames[-1]) > 1 and frames[-1][-1].strip(" ^~"))):
                frames[-1].append(line)
        else:  # the exception, and whatever Python prints after it
            rest.append(line)
    ray = f"{os.sep}ray{os.sep}"
    while len(frames) > 1 and ray in frames[0][0]:
        frames.pop(0)
    return [line for f in frames for line in f] + rest


# ---------------------------------------------------------------------------- work on Ray

def cluster_resources() -> tuple[float, float]:
    """CPUs and GPUs of the Ray cluster this process is connected to."""
    import ray

    res = ray.cluster_resources()
    return res.get("CPU", 0), res.get("GPU", 0)


def node() -> tuple[str, str]:
    """Inside a Ray task or trial: this node's address and the cluster's GCS address."""
    import ray

    return ray.util.get_node_ip_address(), ray.get_runtime_context().gcs_address


def report(metrics: dict[str, Any]) -> None:
    """Inside a Tune trial: report one result (an epoch) to Tune."""
    from ray import tune

    tune.report(metrics)


def tune_grid(trainable: Callable[[dict[str, Any]], None], items: list[dict[str, Any]], *,
              resources: dict[str, float], storage: Path, retries: int,
              on_event: Callable[[str, str, dict[str, Any]], None]) -> dict[str, BaseException]:
    """Run ``trainable(item)`` for every item (each with a unique ``trial_id``) as Tune trials.

    ``on_event(trial_id, event, result)`` hears "start", "retry", "result" and "error". Tune's
    state goes under ``storage``; a trial that fails is retried ``retries`` times. Returns the
    trials that still failed: trial id -> the error, the UserError it carries where there is one.
    Ctrl-C raises KeyboardInterrupt here at once (Tune's own handler is off).
    """
    from ray import tune

    # Tune logs each failed attempt's traceback and the list of failed trials; the caller has them.
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logging.getLogger(name).setLevel(logging.CRITICAL)

    def name_of(trial: Any) -> str:
        return trial.config["trial"]["trial_id"]

    def run_item(config: dict[str, Any]) -> None:
        trainable(config["trial"])

    class Events(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            on_event(name_of(trial), "start", {})

        def on_trial_recover(self, iteration, trials, trial, **info):
            on_event(name_of(trial), "retry", {})

        def on_trial_result(self, iteration, trials, trial, result, **info):
            on_event(name_of(trial), "result", result)

        def on_trial_error(self, iteration, trials, trial, **info):
            on_event(name_of(trial), "error", {})

        def on_step_end(self, iteration, trials, **info):
            if interrupted:
                raise KeyboardInterrupt

    with _sigint_noted() as interrupted:  # on_step_end reads it
        tuner = tune.Tuner(
            tune.with_resources(run_item, resources),
            param_space={"trial": tune.grid_search(items)},
            tune_config=tune.TuneConfig(trial_name_creator=name_of, trial_dirname_creator=name_of,
                                        reuse_actors=True),  # no new worker (and torch import) per trial
            run_config=tune.RunConfig(
                name=f"run-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(storage),
                failure_config=tune.FailureConfig(max_failures=retries), verbose=0, callbacks=[Events()],
            ),
        )
        results = tuner.fit()
    if interrupted:  # a Ctrl-C whose KeyboardInterrupt did not come through Tune: stop now
        raise KeyboardInterrupt
    return {Path(r.path).name: user_error(r.error) or r.error for r in results if r.error is not None}


@contextlib.contextmanager
def _sigint_noted() -> Iterator[list[int]]:
    """Ctrl-C raises KeyboardInterrupt as usual, and is also noted in the list yielded (a list, not
    an Event: Tune pickles its callbacks, which read it).

    Ray's C++ core runs Python's signal handlers while it blocks and turns the KeyboardInterrupt
    into a status of its own; where a caller drops that status, the interrupt is gone and the
    sweep would run on to its end. The note outlives it: Tune's next step (see tune_grid's
    on_step_end) and the end of the run raise it again. Off the main thread, nothing changes.
    """
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return

    def handler(signum: int, frame: Any) -> None:
        noted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


def map_tasks(fn: Callable[..., Any], calls: list[tuple], *, workers: int, address: str | None = None,
              in_process: bool = False, lost: Callable[[tuple, str], Any] | None = None) -> Iterator[Any]:
    """Yield ``fn(*args)`` for every args tuple in ``calls``, as they finish: on Ray tasks (one CPU
    each, at most ``workers`` at once, on the cluster at ``address`` or an embedded Ray), or in
    this process with ``in_process``.

    On Ray a call whose process dies (a segfault in native code, the out-of-memory killer) fails
    alone: it yields ``lost(args, reason)`` and the other calls go on. In this process nothing can
    outlive such a death.
    """
    if not calls:
        return
    if in_process:
        for args in calls:
            yield fn(*args)
        return
    started = ray_init(address, num_cpus=None if address else workers)
    import ray
    from ray.exceptions import NodeDiedError, OutOfMemoryError, WorkerCrashedError

    try:
        task = ray.remote(num_cpus=1, max_retries=0)(fn)
        args_of = {task.remote(*args): args for args in calls}
        waiting = list(args_of)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            try:
                out = ray.get(ready[0])
            except (WorkerCrashedError, OutOfMemoryError, NodeDiedError) as e:
                if lost is None:
                    raise
                reason = f"{type(e).__name__}: the process running it died ({str(e).strip().splitlines()[0]})"
                out = lost(args_of[ready[0]], reason)
            yield out
    finally:
        if started:
            ray_shutdown()
