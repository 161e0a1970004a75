"""Multi-node Ray without a second SLURM node: a head on 127.0.0.2 and a worker on 127.0.0.3 of
this machine, started by the bootstrap code of the multi-node sweep job (vgg_xai.runtime.start_head,
start_worker, wait_for_nodes), each with its own resources, and a sweep whose trials land on both.

Linux routes all of 127.0.0.0/8 to lo, so the two loopback aliases need no configuration; Ray
refuses a multi-node cluster on 127.0.0.1 itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import ray_processes
from vgg_xai import runtime
from vgg_xai.results import collect_rows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]
HEAD, WORKER = "127.0.0.2", "127.0.0.3"

# The driver as the SLURM job runs it (SweepJob._multi_node, task 0): a fresh Python that joins the
# cluster, runs the sweep through the same Tune driver as a one-node sweep, then interprets the
# trials on the same cluster.
DRIVER = """
import json, sys
from pathlib import Path
from vgg_xai import runtime, sweep
from vgg_xai.config import JobSpec

spec, token, address, out = sys.argv[1:]
plan = sweep.plan(JobSpec.from_yaml(spec), check_local=False)
runtime.wait_for_nodes(address, 2, address.split(":")[0], token=Path(token), timeout=60)
import ray

nodes = [{"ip": n["NodeManagerAddress"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]]
outcome = sweep.run(plan, address=address)
from vgg_xai.postprocess import postprocess

postprocess(plan.sweep_dir, address=address)
ray.shutdown()
Path(out).write_text(json.dumps({"nodes": nodes, "failed": outcome.failed, "unfinished": outcome.unfinished}))
"""


@pytest.fixture
def cluster(tmp_path):
    """Start a head and a worker node of 1 CPU each, and always stop them; yields their state."""
    # Ray's session folder: short (AF_UNIX paths) and this test's alone.
    state = {"temp_dir": tempfile.mkdtemp(prefix="vxr-mn-"), "token": tmp_path / "ray-token",
             "logs": tmp_path / "ray-logs", "nodes": [], "t0": time.monotonic()}
    try:
        head = runtime.start_head(HEAD, 1, 0, state["logs"] / "head.log", token=state["token"],
                                temp_dir=state["temp_dir"])
        state["nodes"].append(head)
        state["nodes"].append(runtime.start_worker(head.address, WORKER, 1, 0, state["logs"] / "worker.log",
                                                 token=state["token"]))
        state["address"] = head.address
        yield state
    finally:
        for pid, cmd in _stop(state).items():  # never leave a Ray process behind, even when a test failed
            print(f"killed a Ray process left behind: {pid} {cmd[:200]}", file=sys.stderr)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(state["temp_dir"], ignore_errors=True)


def _ours(state) -> dict[int, str]:
    """pid -> command line of the live processes of this test's Ray nodes. Ray's daemons stay in the
    process group of their `ray start`; its workers take their own group and rename themselves
    (ray::IDLE, ...), but inherit the environment, which names this test's token file."""
    groups = {node.proc.pid for node in state["nodes"]}
    marker = f"RAY_AUTH_TOKEN_PATH={state['token'].absolute()}\0".encode()
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ours = int(fields[2]) in groups or state["temp_dir"] in cmd or marker in (p / "environ").read_bytes()
            except (OSError, IndexError):
                continue
            if ours and fields[0] != "Z":
                out[int(p.name)] = cmd
    return out


def _stop(state, timeout: float = 30) -> dict[int, str]:
    """Stop the nodes (the worker first, while the head can still drain it); what is left after ``timeout``."""
    for node in reversed(state["nodes"]):
        node.stop(timeout=timeout)
    end = time.monotonic() + timeout
    while _ours(state) and time.monotonic() < end:
        time.sleep(0.5)
    return _ours(state)


def _spec(tmp_path: Path, cache: Path) -> Path:
    """Two 1-CPU trials on two 1-CPU nodes: they can only run at once on different nodes."""
    d = {"name": "mn", "data": {"source": str(cache)}, "model": {"width": 0.125},
         "grid": {"variant": ["plain", "bn"], "lr_schedule": ["const_1e-3"]},
         "training": {"epochs": 1, "batch_size": 64, "precision": "fp32"},
         "resources": {"cpu": 1}, "retries": 0, "results": str(tmp_path / "results")}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_sweep_trials_land_on_both_nodes(tmp_path, tiny_cache, cluster):
    out = tmp_path / "driver.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # the token comes from the file
    try:
        r = subprocess.run([sys.executable, "-c", DRIVER, str(_spec(tmp_path, tiny_cache)), str(cluster["token"]),
                            cluster["address"], str(out)], capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the driver did not finish in 120 s:\n{e.stdout}\n{e.stderr}\n"
                    + "\n".join(f"{n.log}:\n{n.log_tail()}" for n in cluster["nodes"]))
    print(f"\nnodes up, sweep of 2 trials and its post-processing: {time.monotonic() - cluster['t0']:.1f} s")
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    result = json.loads(out.read_text())

    # each node registered the resources it was given
    nodes = {n["ip"]: n["resources"] for n in result["nodes"]}
    assert set(nodes) == {HEAD, WORKER}
    assert all(res.get("CPU") == 1 and res.get("GPU", 0) == 0 for res in nodes.values()), nodes

    # both trials finished, one on each node, and the tables were written
    assert result["failed"] == [] and result["unfinished"] == []
    sweep_dir = tmp_path / "results" / "mn"
    trials = {r["trial_id"]: r["status"] for r in collect_rows(sweep_dir)}
    assert trials == {"plain-lr1e-3-s0": "completed", "bn-lr1e-3-s0": "completed"}
    ran_on = {json.loads(line)["node"] for t in trials
              for line in (sweep_dir / "trials" / t / "attempts.jsonl").read_text().splitlines()}
    assert ran_on == {HEAD, WORKER}
    table = json.loads((sweep_dir / "tables" / "accuracy.json").read_text())
    assert sorted(row["trial_id"] for row in table["rows"]) == sorted(trials)
    assert (sweep_dir / "tables" / "accuracy.csv").is_file()
    _assert_stop_leaves_nothing(cluster)


def test_a_process_that_ran_an_embedded_ray_joins_as_driver(cluster):
    """The driver joins, sees each node's resources and uses both, even in a process that has run an
    embedded Ray before (Ray had cached the token it read then: what made the driver hang)."""
    saved = dict(os.environ)
    try:
        runtime.ray_init(num_cpus=1)  # the embedded Ray of a one-node sweep, in this process
        import ray

        ray.shutdown()
        runtime.wait_for_nodes(cluster["address"], 2, HEAD, token=cluster["token"], timeout=60, nodes=cluster["nodes"])
        try:
            nodes = {n["NodeManagerAddress"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
            assert set(nodes) == {HEAD, WORKER}
            assert [nodes[ip].get("CPU") for ip in (HEAD, WORKER)] == [1, 1]
            where = ray.remote(num_cpus=1)(lambda: (time.sleep(1), ray.util.get_node_ip_address())[1])
            assert set(ray.get([where.remote() for _ in range(2)], timeout=60)) == {HEAD, WORKER}
            assert any(cmd.startswith("ray::") for cmd in _ours(cluster).values())  # workers are told apart too
        finally:
            ray.shutdown()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    _assert_stop_leaves_nothing(cluster)


def _assert_stop_leaves_nothing(cluster) -> None:
    running = _ours(cluster).values()
    assert sum("raylet" in cmd for cmd in running) == 2 and sum("gcs_server" in cmd for cmd in running) == 1
    assert any(cluster["temp_dir"] in cmd for cmd in ray_processes())  # conftest's view finds them too
    t0 = time.monotonic()
    assert _stop(cluster) == {}
    print(f"nodes stopped in {time.monotonic() - t0:.1f} s")
    assert not any(cluster["temp_dir"] in cmd for cmd in ray_processes())
