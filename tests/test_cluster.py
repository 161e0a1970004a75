"""A real SLURM of three nodes on this machine (`cluster/local-slurm/local-slurm start --nodes 3`):
each node a slurmd in a network namespace of its own, with its own name and address. The cluster
here is this module's own (its own run dir, tag, subnet and node names), so that a SLURM that CI or
another test started is neither seen nor stopped.
"""

from __future__ import annotations

import json
import re
import sys
import subprocess
import time
from pathlib import Path

import pytest

from conftest import LOCAL_SLURM, RUN_MARK
from slurm_nodes import Cluster, running, started, submit, wait_states
from vgg_xai.results import collect_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nodes3():
    with started(3) as cluster:
        yield cluster


def test_three_nodes_each_with_its_own_name_and_address(nodes3):
    names = [n[0] for n in nodes3.nodes]
    addrs = {n[0]: n[2] for n in nodes3.nodes}
    assert len(names) == 3 and len(set(names)) == 3 and len(set(addrs.values())) == 3
    assert all(a.startswith(nodes3.subnet + ".") for a in addrs.values())

    # SLURM knows three idle nodes, each at the address its namespace has
    r = nodes3.run("sinfo", "-h", "-N", "-o", "%N|%T|%o")
    assert r.returncode == 0, r.stderr
    seen = sorted(line.split("|") for line in r.stdout.splitlines())
    assert seen == [[n, "idle", addrs[n]] for n in names], r.stdout

    # one task a node: each ran on its own node, under its own host name, with that node's address,
    # and with no route beyond the nodes' subnet
    script = ('echo "$SLURMD_NODENAME|$(hostname)|$(ip -4 -o addr show dev eth0 | awk \'{print $4}\')|'
              '$(ip -4 route | tr \'\\n\' \';\')"')
    r = nodes3.run("srun", "-N3", "--ntasks-per-node=1", "sh", "-c", script, timeout=120)
    assert r.returncode == 0, r.stderr
    tasks = sorted(line.split("|") for line in r.stdout.splitlines())
    assert [t[0] for t in tasks] == names, r.stdout
    for node, host, addr, routes in tasks:
        assert host == node and addr == f"{addrs[node]}/24", tasks
        assert routes.rstrip(";").split(";") == [f"{nodes3.subnet}.0/24 dev eth0 proto kernel scope link "
                                                 f"src {addrs[node]} "], routes

    # a real network path from node to node: a server on the first node sees the second node's address
    first, second = names[0], names[1]
    server = subprocess.Popen(
        ["srun", "-N1", "-w", first, sys.executable, "-c",
         "import socket; s = socket.create_server((socket.gethostbyname(socket.gethostname()), 7123)); "
         "print('listening', flush=True); c, peer = s.accept(); print(peer[0], c.recv(64).decode(), flush=True)"],
        env=nodes3.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        r = nodes3.run("srun", "-N1", "-w", second, sys.executable, "-c",
                       f"import socket; socket.create_connection(('{first}', 7123), timeout=10).sendall(b'hi')")
        assert r.returncode == 0, r.stderr
        out, err = server.communicate(timeout=60)
        assert out.split() == [addrs[second], "hi"], (out, err)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _listeners(ns: str | None) -> list[tuple[str, str, int]]:
    """(address:port, program, pid) of the TCP listeners in network namespace ``ns`` (None: the machine's own)."""
    cmd = ["ss", "-ltnpH"] if ns is None else ["nsenter", f"--net=/run/netns/{ns}", "ss", "-ltnpH"]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    return [(line.split()[3], prog, int(pid)) for line in out.splitlines()
            for prog, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line)]


def _started_here(pid: int) -> bool:
    try:
        return f"VGG_XAI_TEST_RUN={RUN_MARK}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def test_a_sweep_runs_across_two_nodes(nodes3, tmp_path, tiny_cache):
    """cluster/local-multi.yaml (nodes: 2): one Ray cluster over the two nodes of the allocation, each
    node's Ray on that node's address; trials of 2 CPUs on nodes of 2 CPUs, so both nodes train."""
    spec = {"name": "mn", "data": {"source": str(tiny_cache)}, "model": {"width": 0.125},
            "grid": {"variant": ["plain", "bn"], "lr_schedule": ["const_1e-3"]},
            "training": {"epochs": 1, "batch_size": 64, "precision": "fp32"},
            "resources": {"cpu": 2}, "retries": 1, "results": str(tmp_path / "results")}
    t0 = time.monotonic()
    ids, sweep = submit(nodes3, spec, tmp_path, "local-multi.yaml")
    jobs = dict(ids)
    # While it runs: where do this run's Ray daemons listen? Each node's in its own namespace (whose
    # only addresses are the node's and its own loopback), none in the machine's own namespace.
    daemons = {int(p.read_text().split()[0]) for p in [*nodes3.run_dir.glob("run/*.pid"),
                                                        nodes3.run_dir / "munge" / "munged.pid"]}
    ray_on: dict[str, set[str]] = {n[0]: set() for n in nodes3.nodes}
    outside: list[tuple[str, str, int]] = []
    ours_here: set[str] = set()  # the cluster's own daemons, which do listen there: the filter finds them

    def sample() -> None:
        for name, ns, _, _ in nodes3.nodes:
            ray_on[name] |= {local for local, prog, _ in _listeners(ns) if prog in ("raylet", "gcs_server")}
        mine = [x for x in _listeners(None) if _started_here(x[2])]
        ours_here.update(prog for _, prog, pid in mine if pid in daemons)
        outside.extend(x for x in mine if x[2] not in daemons)

    states = wait_states(nodes3, [jobs["sweep"], jobs["postprocess"]], while_waiting=sample)
    print(f"\nsubmit to done on 2 nodes (2 trials x 1 epoch, then post-processing): {time.monotonic() - t0:.1f} s")
    status = nodes3.run(sys.executable, "-m", "vgg_xai.cli", "status", str(sweep)).stdout
    assert states == {jobs["sweep"]: "COMPLETED", jobs["postprocess"]: "COMPLETED"}, status

    # the sweep job had two nodes, and each of them trained a trial, under its own name and address
    out = nodes3.run("sacct", "-X", "-n", "-P", "-o", "NodeList", "-j", jobs["sweep"]).stdout.strip()
    allocated = set(nodes3.run("scontrol", "show", "hostnames", out).stdout.split())
    addrs = {n[0]: n[2] for n in nodes3.nodes}
    assert len(allocated) == 2 and allocated <= set(addrs), out
    rows = collect_rows(sweep)
    assert sorted(r["status"] for r in rows) == ["completed", "completed"]
    attempts = [json.loads(line) for r in rows
                for line in (sweep / "trials" / r["trial_id"] / "attempts.jsonl").read_text().splitlines()]
    assert {a["host"] for a in attempts} == allocated, attempts
    assert all(a["node"] == addrs[a["host"]] and a["slurm_job_id"] == jobs["sweep"] for a in attempts), attempts
    assert {n for n, seen in ray_on.items() if seen} == allocated, ray_on
    assert outside == [] and "slurmctld" in ours_here  # nothing of the job listened in the machine's namespace
    # `vgg-xai status` says which node ran which trial; `vgg-xai logs` where each attempt ran
    shown = {line.split()[0]: line for line in status.splitlines() if line.split()}
    for r in rows:
        trial = sweep / "trials" / r["trial_id"]
        tried = [json.loads(line) for line in (trial / "attempts.jsonl").read_text().splitlines()]
        assert shown[r["trial_id"]].endswith(f"slurm {jobs['sweep']} on {tried[-1]['host']}"), status
        log = nodes3.run(sys.executable, "-m", "vgg_xai.cli", "logs", str(sweep), r["trial_id"]).stdout
        for i, a in enumerate(tried, 1):
            where = f"on {a['host']} (PID {a['pid']}, SLURM job {jobs['sweep']}, Ray node {a['node']})"
            assert f"attempt {i} {where}" in log, log
    # the Ray nodes bound the nodes' own addresses: the head's log names its address
    logs = "".join(p.read_text(errors="replace") for p in (sweep / "slurm" / "ray-logs").glob("*.log"))
    assert any(f"{addrs[n]}:" in logs for n in allocated), logs[-2000:]
    # post-processing completed: tables and report
    assert (sweep / "tables" / "accuracy.csv").is_file() and (sweep / "report.html").is_file()
    table = json.loads((sweep / "tables" / "accuracy.json").read_text())
    assert sorted(row["trial_id"] for row in table["rows"]) == sorted(r["trial_id"] for r in rows)


def _submit(cluster: Cluster, tmp_path: Path, cache: Path, name: str, variants: list[str], profile: str, *args: str):
    """Submit a sweep of 1-epoch trials of 2 CPUs each (a whole node of this cluster); its job ids and folder."""
    d = tmp_path / name
    d.mkdir()
    spec = {"name": name, "data": {"source": str(cache)}, "model": {"width": 0.125},
            "grid": {"variant": variants, "lr_schedule": ["const_1e-3"]},
            "training": {"epochs": 1, "batch_size": 64, "precision": "fp32"},
            "resources": {"cpu": 2}, "retries": 1, "results": str(d / "results")}
    return submit(cluster, spec, d, profile, *args)


def _hosts(sweep: Path) -> dict[str, list[str]]:
    """trial id -> the host of each of its attempts."""
    return {t.name: [json.loads(line)["host"] for line in (t / "attempts.jsonl").read_text().splitlines()]
            for t in sorted((sweep / "trials").iterdir()) if (t / "attempts.jsonl").is_file()}


def test_an_array_spreads_over_the_nodes(nodes3, tmp_path, tiny_cache):
    """--mode array: one task a trial, each task a whole node (2 CPUs), so three trials run on three nodes."""
    t0 = time.monotonic()
    ids, sweep = _submit(nodes3, tmp_path, tiny_cache, "arr", ["plain", "bn", "l2"], "local.yaml", "--mode", "array")
    assert [role for role, _ in ids] == ["trial", "trial", "trial", "postprocess"], ids
    states = wait_states(nodes3, [jid for _, jid in ids])
    print(f"\narray of 3 trials on 3 nodes, then post-processing: {time.monotonic() - t0:.1f} s")
    assert set(states.values()) == {"COMPLETED"}, states
    hosts = _hosts(sweep)
    assert len(hosts) == 3 and {h[-1] for h in hosts.values()} == {n[0] for n in nodes3.nodes}, hosts
    assert sorted(r["status"] for r in collect_rows(sweep)) == ["completed"] * 3
    status = nodes3.run(sys.executable, "-m", "vgg_xai.cli", "status", str(sweep)).stdout
    for trial, h in hosts.items():
        line = next(x for x in status.splitlines() if x.startswith(trial + " "))
        assert line.endswith(f" on {h[-1]}") and " slurm " in line, status


def test_two_sweep_jobs_share_the_cluster(nodes3, tmp_path, tiny_cache):
    """One sweep job on two nodes and one on the third, at the same time: each has its own Ray, and both
    complete with their post-processing."""
    t0 = time.monotonic()
    two, sweep2 = _submit(nodes3, tmp_path, tiny_cache, "two", ["plain", "bn"], "local-multi.yaml")
    one, sweep1 = _submit(nodes3, tmp_path, tiny_cache, "one", ["bn"], "local.yaml")
    ids = dict(two), dict(one)
    states = wait_states(nodes3, [jid for _, jid in two + one])
    print(f"\na 2-node and a 1-node sweep job at once, with their post-processing: {time.monotonic() - t0:.1f} s")
    assert set(states.values()) == {"COMPLETED"}, states
    out = nodes3.run("sacct", "-X", "-n", "-P", "-o", "JobID,Start,End,NodeList", "-j",
                     f"{ids[0]['sweep']},{ids[1]['sweep']}").stdout
    (s0, e0, n0), (s1, e1, n1) = [line.split("|")[1:] for line in out.splitlines()]
    assert s1 < e0 and s0 < e1, out  # at the same time
    on2 = set(nodes3.run("scontrol", "show", "hostnames", n0).stdout.split())
    on1 = set(nodes3.run("scontrol", "show", "hostnames", n1).stdout.split())
    assert len(on2) == 2 and len(on1) == 1 and not on1 & on2, out
    assert {h for hs in _hosts(sweep2).values() for h in hs} == on2
    assert {h for hs in _hosts(sweep1).values() for h in hs} == on1
    rays = [json.loads((s / "trials" / "bn-lr1e-3-s0" / "attempts.jsonl").read_text().splitlines()[0])["ray"]
            for s in (sweep2, sweep1)]
    assert all(rays) and rays[0] != rays[1]  # two Ray clusters, one a job
    for s in (sweep2, sweep1):
        assert (s / "report.html").is_file() and all(r["status"] == "completed" for r in collect_rows(s))


def test_kill_node_kills_every_process_of_the_node_at_once(nodes3):
    """`local-slurm kill-node` as a node dies: SIGKILL to its slurmd and everything on it, and DOWN in
    SLURM; the other nodes go on taking jobs."""
    name, ns = nodes3.nodes[2][:2]
    slurmd = int((nodes3.run_dir / "run" / f"slurmd-{name}.pid").read_text())
    on_it = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "sleep", "600"])  # stands for a trial
    t0 = time.monotonic()
    r = nodes3.run(str(LOCAL_SLURM), "kill-node", name)
    print(f"\nkill-node: {time.monotonic() - t0:.1f} s")
    assert r.returncode == 0, r.stderr
    assert on_it.wait(timeout=5) == -9 and not running(slurmd)
    assert subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split() == []
    states = dict(line.split("|") for line in nodes3.run("sinfo", "-h", "-N", "-o", "%N|%T").stdout.splitlines())
    assert states[name].startswith("down") and [states[n[0]] for n in nodes3.nodes[:2]] == ["idle", "idle"], states
    r = nodes3.run("srun", "-N2", "hostname", timeout=60)
    assert r.returncode == 0 and sorted(r.stdout.split()) == [n[0] for n in nodes3.nodes[:2]], (r.stdout, r.stderr)
    r = nodes3.run(str(LOCAL_SLURM), "kill-node", "nope")
    assert r.returncode == 1 and "no node 'nope' in this cluster" in r.stderr


def test_stop_removes_what_start_made_and_nothing_else(nodes3):
    """Last in this module: it stops the module's cluster."""
    run_dir = nodes3.run_dir
    files = [*run_dir.glob("run/*.pid"), run_dir / "munge" / "munged.pid"]
    pids = {p.name: int(p.read_text().split()[0]) for p in files}
    states = dict(line.split("|") for line in nodes3.run("sinfo", "-h", "-N", "-o", "%N|%T").stdout.splitlines())
    up = {f"slurmd-{n}.pid" for n, state in states.items() if not state.startswith("down")}
    assert len(pids) == 4 + 3 and {f for f, p in pids.items() if running(p)} == set(pids) - {
        f"slurmd-{n}.pid" for n in states} | up  # every daemon runs but the slurmd of a node killed above
    pids = [p for p in pids.values() if running(p)]
    # what a job left behind on a node (a process in its namespace that SLURM no longer tracks)
    ns = nodes3.nodes[1][1]
    left = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "sleep", "600"])
    # a namespace and a link of the same pattern that start did not make: stop must leave them be
    tag = ns.rsplit("-", 2)[1]
    decoy_ns, decoy_link = f"vgg-xai-{tag}-9", f"vx{tag}n9"
    subprocess.run(["ip", "netns", "add", decoy_ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", decoy_link, "type", "veth", "peer", "name", f"vx{tag}m9"], check=True)
        try:
            t0 = time.monotonic()
            r = nodes3.run(str(LOCAL_SLURM), "stop", "--purge")
            stop_s = time.monotonic() - t0
            print(f"\n3-node SLURM stopped in {stop_s:.1f} s")
            assert r.returncode == 0, r.stderr
            assert left.wait(timeout=10) != 0  # killed
            assert [p for p in pids if running(p)] == []
            netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
            for name, namespace, _, link in nodes3.nodes:
                assert namespace not in netns and f" {link}@" not in links and f" {link}:" not in links
                assert not Path(f"/sys/fs/cgroup/freezer/slurm_{name}").exists()
            assert f" {nodes3.bridge}:" not in links
            assert not run_dir.exists()
            assert decoy_ns in netns and f" {decoy_link}@" in links  # not its to remove
        finally:
            subprocess.run(["ip", "link", "del", decoy_link])
    finally:
        subprocess.run(["ip", "netns", "del", decoy_ns])
        if left.poll() is None:
            left.kill()
