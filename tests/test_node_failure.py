"""A node that dies in the middle of a multi-node sweep, on a real SLURM of three nodes on this
machine (tests/slurm_nodes.py): its slurmd and every process on it killed with SIGKILL at once and
the node marked DOWN (`local-slurm kill-node`), once for a worker node of the sweep's Ray and once
for the head node, where the driver runs.

SLURM ends a job whose node fails, whichever node it is, and requeues it (a batch job is requeueable
by default). The requeued job runs the same sweep on the nodes that are up: it keeps every finished
trial and continues every other one from its last checkpoint, so at most the epoch in flight is
lost. The post-processing job waits for the requeued job's end and then writes the tables and the
report. Each test prints the failure's timeline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import LOCAL_SLURM, make_images, write_image_tree
from slurm_nodes import Cluster, running, sacct, started, submit, wait_states
from vgg_xai import trial_folder
from vgg_xai.results import collect_rows

pytestmark = pytest.mark.slow
EPOCHS = 3


@pytest.fixture
def nodes3():
    with started(3) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """1,000 training images: an epoch long enough (seconds) for a node to die in its middle."""
    from vgg_xai.data import prepare

    tree = write_image_tree(tmp_path_factory.mktemp("node-failure") / "png",
                            {"train": make_images(100, seed=1), "test": make_images(20, seed=2)})
    return prepare(tree, tmp_path_factory.mktemp("node-failure-cache") / "data.h5")


def _job(cluster: Cluster, job_id: str) -> dict[str, str]:
    """scontrol's fields of a job (BatchHost, NodeList, Restarts, JobState, ...)."""
    text = cluster.run("scontrol", "show", "job", "-o", job_id).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _trials(sweep: Path) -> dict[str, dict]:
    """Each trial's state now: finished, epochs in its history, its attempts."""
    out = {}
    for t in sorted((sweep / "trials").glob("*")):
        if t.is_dir():
            out[t.name] = {"finished": trial_folder.finished(t), "epochs": len(trial_folder.read_history(t)),
                           "attempts": trial_folder.read_attempts(t)}
    return out


def _spec(cache: Path, tmp_path: Path) -> dict:
    """Four trials of 2 CPUs (a whole node each): two run at a time on a 2-node sweep job."""
    return {"name": "nf", "data": {"source": str(cache)}, "model": {"width": 0.125},
            "grid": {"variant": ["bn", "bn_dropout"], "lr_schedule": ["const_1e-3", "alternate"]},
            "training": {"epochs": EPOCHS, "batch_size": 32, "precision": "fp32"},
            "resources": {"cpu": 2}, "retries": 1, "results": str(tmp_path / "results")}


def _moment(cluster: Cluster, job_id: str, sweep: Path, victim: str) -> tuple[str, list[str], list[str]]:
    """Wait until two trials have finished and a trial on the victim node (the job's "head" or its
    "worker") is past its first epoch: that node, the job's nodes, and the trials on it."""
    end = time.monotonic() + 600
    while True:
        assert time.monotonic() < end, f"no moment to kill a node: {_trials(sweep)}"
        job = _job(cluster, job_id)
        if job.get("JobState") == "RUNNING":
            allocated = cluster.hostnames(job["NodeList"])
            node = job["BatchHost"] if victim == "head" else next(n for n in allocated if n != job["BatchHost"])
            trials = _trials(sweep)
            done = [t for t, s in trials.items() if s["finished"]]
            hit = [t for t, s in trials.items() if not s["finished"] and s["epochs"] >= 1 and s["attempts"]
                   and s["attempts"][-1]["host"] == node and s["epochs"] < EPOCHS]
            assert len(done) < 4, f"every trial finished before a node could be killed: {trials}"
            if len(done) >= 2 and hit:
                return node, allocated, hit
        time.sleep(0.3)


@pytest.mark.parametrize("victim", ["worker", "head"])
def test_a_node_that_dies_mid_sweep_loses_at_most_the_epoch_in_flight(nodes3, tmp_path, cache, victim):
    """Once two trials have finished and a trial on the victim node has a checkpoint, the node dies."""
    spec = _spec(cache, tmp_path)
    ids, sweep = submit(nodes3, spec, tmp_path, "local-multi.yaml")
    jobs = dict(ids)

    node, allocated, hit = _moment(nodes3, jobs["sweep"], sweep, victim)
    survivor = next(n for n in allocated if n != node)
    on_survivor = nodes3.pids(survivor)  # the job's processes there: its step, Ray, trials
    t_kill = time.time()
    k = nodes3.run(str(LOCAL_SLURM), "kill-node", node)
    assert k.returncode == 0, k.stderr
    before = _trials(sweep)  # read after the kill: what the node wrote last is on disk
    hit = [t for t in hit if not before[t]["finished"]]
    assert hit, f"the trial on {node} finished as the node died: {before}"

    # SLURM ends the job on every node (nothing of it runs on the survivor) and requeues it.
    timeline = {}
    end = time.monotonic() + 120
    while "cleared" not in timeline or "requeued" not in timeline:
        assert time.monotonic() < end, (timeline, [p for p in on_survivor if running(p)], _job(nodes3, jobs["sweep"]))
        now = time.time() - t_kill
        if "cleared" not in timeline and not [p for p in on_survivor if running(p)]:
            timeline["cleared"] = now
        if "requeued" not in timeline and _job(nodes3, jobs["sweep"]).get("Restarts", "0") != "0":
            timeline["requeued"] = now
        time.sleep(0.2)
    states = wait_states(nodes3, [jobs["sweep"], jobs["postprocess"]], timeout=900)
    timeline["end"] = time.time() - t_kill
    status = nodes3.run(sys.executable, "-m", "vgg_xai.cli", "status", str(sweep)).stdout
    assert states == {jobs["sweep"]: "COMPLETED", jobs["postprocess"]: "COMPLETED"}, status

    # the job ran twice: ended by the node's failure, then on the nodes that are up
    runs = sacct(nodes3, [jobs["sweep"]], "State,NodeList", every_run=True)
    assert [s.split()[0] for s, _ in runs] in (["NODE_FAIL", "COMPLETED"], ["REQUEUED", "COMPLETED"]), runs
    assert node not in nodes3.hostnames(runs[-1][1]), runs

    after = _trials(sweep)
    rows = collect_rows(sweep)
    assert sorted(r["status"] for r in rows) == ["completed"] * 4, status
    for t, s in before.items():
        if s["finished"]:  # not trained again: no attempt since
            assert after[t]["attempts"] == s["attempts"], (t, after[t]["attempts"])
    resumed = []
    for t in hit:  # continued from its last checkpoint, on a node that is up
        new = [a for a in after[t]["attempts"] if a["time"] > t_kill]
        assert new and all(a["host"] != node for a in new), (t, after[t]["attempts"])
        assert new[-1]["start_epoch"] >= before[t]["epochs"] >= 1, (t, before[t], new)
        resumed.append(min(a["time"] for a in new) - t_kill)
    for t in after:
        assert [int(h["epoch"]) for h in trial_folder.read_history(sweep / "trials" / t)] == list(range(1, EPOCHS + 1))
    timeline["resumed"] = min(resumed)
    assert (sweep / "report.html").is_file()
    table = json.loads((sweep / "tables" / "accuracy.json").read_text())
    assert sorted(row["trial_id"] for row in table["rows"]) == sorted(after)
    print(f"\n{victim} node {node} killed mid-sweep (trial {', '.join(hit)} at epoch {before[hit[0]]['epochs']}): "
          + ", ".join(f"{k} +{v:.1f} s" for k, v in sorted(timeline.items(), key=lambda kv: kv[1])))


def test_a_worker_whose_ray_dies_while_its_node_lives_rejoins_the_sweep(nodes3, tmp_path, cache):
    """The raylet of the worker node is killed, the node itself lives: SLURM sees nothing, the job's
    task on that node starts its Ray again and the node rejoins; Ray retries the trial it lost from
    its checkpoint, and the job completes without a requeue."""
    ids, sweep = submit(nodes3, _spec(cache, tmp_path), tmp_path, "local-multi.yaml")
    jobs = dict(ids)
    node, _, hit = _moment(nodes3, jobs["sweep"], sweep, "worker")
    raylets = [p for p in nodes3.pids(node) if Path(f"/proc/{p}/comm").read_text().strip() == "raylet"]
    assert len(raylets) == 1, raylets
    t_kill = time.time()
    os.kill(raylets[0], signal.SIGKILL)
    states = wait_states(nodes3, [jobs["sweep"], jobs["postprocess"]], timeout=900)
    status = nodes3.run(sys.executable, "-m", "vgg_xai.cli", "status", str(sweep)).stdout
    assert states == {jobs["sweep"]: "COMPLETED", jobs["postprocess"]: "COMPLETED"}, status
    runs = sacct(nodes3, [jobs["sweep"]], "JobID,State", every_run=True)
    assert [state.split()[0] for _, state in runs] == ["COMPLETED"], runs  # one run: no requeue
    log = next((sweep / "slurm" / "ray-logs").glob("*-worker1.log")).read_text(errors="replace")
    assert log.count("Ray runtime started") == 2, log[-3000:]  # started again, and joined
    err = next((sweep / "slurm" / jobs["sweep"]).glob("*_1_log.err")).read_text(errors="replace")
    assert "the Ray worker on" in err and "(start 1 of 3)" in err, err[-2000:]
    assert sorted(r["status"] for r in collect_rows(sweep)) == ["completed"] * 4, status
    for t in hit:
        new = [a for a in trial_folder.read_attempts(sweep / "trials" / t) if a["time"] > t_kill]
        assert new and new[-1]["start_epoch"] >= 1, (t, new)
        print(f"\nworker {node}'s raylet killed: trial {t} resumed +{new[0]['time'] - t_kill:.1f} s "
              f"from epoch {new[-1]['start_epoch']} on {new[-1]['host']}")
