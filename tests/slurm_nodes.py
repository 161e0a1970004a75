"""A real SLURM of several nodes on this machine, for tests: `cluster/local-slurm/local-slurm start
--nodes N` with a run dir of the test's own (its own tag, subnet, node names and job ids), so that a
SLURM that CI or another test started is neither seen nor stopped."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml

from conftest import LOCAL_SLURM, REPO

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


@dataclass
class Cluster:
    run_dir: Path
    env: dict[str, str]  # SLURM_CONF of this cluster, no_proxy with its addresses
    nodes: list[tuple[str, str, str, str]]  # name, network namespace, address, host-side link
    bridge: str
    subnet: str  # the first three octets of the nodes' /24
    start_s: float

    def run(self, *cmd: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, **kw)

    def namespace(self, node: str) -> str:
        return next(ns for name, ns, _, _ in self.nodes if name == node)

    def pids(self, node: str) -> set[int]:
        """Every process on ``node`` (in its network namespace) but its slurmd."""
        out = subprocess.run(["ip", "netns", "pids", self.namespace(node)], capture_output=True, text=True).stdout
        slurmd = self.run_dir / "run" / f"slurmd-{node}.pid"
        daemon = int(slurmd.read_text()) if slurmd.is_file() else -1
        return {int(p) for p in out.split()} - {daemon}

    def hostnames(self, nodelist: str) -> list[str]:
        return self.run("scontrol", "show", "hostnames", nodelist).stdout.split()


def cannot_start() -> str | None:
    """Why a multi-node local SLURM cannot start here, or None."""
    if os.geteuid() != 0:
        return "the local SLURM needs root (cluster/local-slurm/local-slurm)"
    if shutil.which("slurmctld") is None:
        return "SLURM is not installed here: run cluster/local-slurm/local-slurm install"
    for tool, package in (("ip", "iproute2"), ("ss", "iproute2"), ("nsenter", "util-linux"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} not found: the nodes' network namespaces need {package}"
    r = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"this machine cannot make network namespaces: {r.stderr.strip()}"
    return None


@contextlib.contextmanager
def started(n: int) -> Iterator[Cluster]:
    """A cluster of ``n`` nodes for the block, stopped and removed after it; the test is skipped, saying
    why, where this machine cannot start one."""
    reason = cannot_start()
    if reason:
        pytest.skip(reason=reason)
    run_dir = Path(tempfile.mkdtemp(prefix="vgg-xai-test-nodes-", dir="/tmp"))  # short: munge's socket path
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    env["VGG_XAI_SLURM_DIR"] = str(run_dir)
    try:
        t0 = time.monotonic()
        r = subprocess.run([str(LOCAL_SLURM), "start", "--nodes", str(n)], env=env, capture_output=True, text=True,
                           timeout=300)
        start_s = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        print(f"\n{n}-node SLURM started in {start_s:.1f} s")
        env["SLURM_CONF"] = r.stdout.strip().splitlines()[-1].split("=", 1)[1]
        nodes = [tuple(line.split()) for line in (run_dir / "nodes").read_text().splitlines()]
        bridge, subnet = (run_dir / "net").read_text().split()
        # the nodes' addresses bypass the (closed) proxy, as loopback does
        direct = ",".join([env.get("no_proxy", "127.0.0.1,localhost"), f"{subnet}.1", *(n[2] for n in nodes)])
        env["no_proxy"] = env["NO_PROXY"] = direct
        yield Cluster(run_dir, env, nodes, bridge, subnet, start_s)
    finally:
        subprocess.run([str(LOCAL_SLURM), "stop", "--purge"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(run_dir, ignore_errors=True)


def submit(cluster: Cluster, spec: dict, folder: Path, profile: str, *args: str) -> tuple[list[tuple[str, str]], Path]:
    """Write ``spec`` to ``folder``/spec.yaml and `vgg-xai submit` it with cluster/``profile``: the (role, job id)
    pairs it prints, and the sweep folder."""
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    r = cluster.run(sys.executable, "-m", "vgg_xai.cli", "submit", str(folder / "spec.yaml"), "--cluster",
                    str(REPO / "cluster" / profile), *args, timeout=300)
    assert r.returncode == 0, r.stderr
    ids = [(line.split()[0], line.split()[1]) for line in r.stdout.splitlines()
           if line.split()[0] in ("sweep", "trial", "postprocess")]
    return ids, Path(spec["results"]) / spec["name"]


def sacct(cluster: Cluster, ids: list[str], fields: str = "JobID,State", every_run: bool = False) -> list[list[str]]:
    """sacct's rows of the jobs (their allocations); ``every_run``: a row for each run of a requeued job."""
    out = cluster.run("sacct", "-X", *(["-D"] if every_run else []), "-n", "-P", "-o", fields,
                      "-j", ",".join(ids)).stdout
    return [line.split("|") for line in out.splitlines() if "|" in line]


def wait_states(cluster: Cluster, ids: list[str], timeout: float = 600,
                while_waiting: Callable[[], None] = lambda: None) -> dict[str, str]:
    """Wait until every job of ``ids`` has ended; their final states."""
    end = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < end:
        while_waiting()
        states = {job: state.split()[0] for job, state in sacct(cluster, ids)}
        if len(states) == len(ids) and set(states.values()) <= FINAL:
            return states
        time.sleep(2)
    raise AssertionError(f"jobs {ids} did not end: {states}")


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
