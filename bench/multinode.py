"""A sweep job's overhead on 1, 2 and 3 SLURM nodes with the same total CPUs, and the time from
`vgg-xai submit` to the first epoch.

Starts its own local SLURM of three nodes (cluster/local-slurm, needs root; each node offers
`--cpus` CPUs) and stops it at the end. For n = 1, 2, 3 it submits the same sweep of T one-epoch
trials of one CPU each with a profile of n nodes of T/n CPUs (the same T slots in all three, so
every trial runs at once), and measures:

- submit -> first epoch: from `vgg-xai submit` to the first history row of any trial;
- makespan: from submit to the last trial's result;
- overhead per trial: (makespan x slots - the trials' own wall time) / trials, the slot time that
  went to SLURM, Ray's start on n nodes and Tune rather than to a trial.

The ratios are against one node in the same run. The sweep job is cancelled once its trials are
done (its post-processing is not what this measures), and the next starts once the queue is empty. Run:  python bench/multinode.py [--trials 6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_overhead import tiny_cache  # noqa: E402

from vgg_xai import trial_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO / "cluster" / "local-slurm" / "local-slurm"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("http_proxy", "http://127.0.0.1:9")


def one(env: dict[str, str], root: Path, cache: Path, nodes: int, trials: int) -> dict[str, float]:
    work = root / f"n{nodes}"
    work.mkdir()
    profile = {"partition": "debug", "nodes": nodes, "cpus_per_task": trials // nodes, "gpus_per_node": 0,
               "mem_gb": 2, "time_min": 30, "signal_delay_s": 60}
    (work / "profile.yaml").write_text(yaml.safe_dump(profile))
    lrs = ["const_1e-3", "const_1e-2", "alternate"]
    grid = {"variant": ["bn", "bn_dropout"], "lr_schedule": lrs, "seed": list(range(max(1, trials // 6)))}
    spec = {"name": f"n{nodes}", "data": {"source": str(cache)}, "model": {"width": 0.125}, "grid": grid,
            "training": {"epochs": 1, "batch_size": 64, "precision": "fp32"}, "resources": {"cpu": 1},
            "retries": 0, "results": str(work / "results")}
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "vgg_xai.cli", "submit", str(work / "spec.yaml"), "--cluster",
                        str(work / "profile.yaml")], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    sweep = work / "results" / f"n{nodes}"
    first = None
    while True:
        dirs = [t for t in (sweep / "trials").glob("*") if t.is_dir()] if (sweep / "trials").is_dir() else []
        if first is None and any(trial_folder.read_history(t) for t in dirs):
            first = time.monotonic() - t0
        results = [r for r in map(trial_folder.read_result, dirs) if r is not None]
        if dirs and len(results) == len(dirs) == trials:
            break
        if time.monotonic() - t0 > 1200:
            raise SystemExit(f"{nodes} node(s): trials not done after 1200 s; see {sweep}")
        time.sleep(0.2)
    makespan = time.monotonic() - t0
    subprocess.run([sys.executable, "-m", "vgg_xai.cli", "cancel", str(sweep)], env=env, capture_output=True)
    end = time.monotonic() + 300  # the next measurement starts on an empty cluster
    while subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip():
        if time.monotonic() > end:
            raise SystemExit(f"{nodes} node(s): jobs still in the queue 300 s after cancel")
        time.sleep(1)
    walls = [r["wall_s"] for r in results]
    hosts = {a["host"] for t in dirs for a in trial_folder.read_attempts(t)}
    return {"first_epoch_s": first, "makespan_s": makespan, "trial_wall_s": sum(walls) / len(walls),
            "overhead_per_trial_s": (makespan * trials - sum(walls)) / trials, "hosts": len(hosts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=6, help="trials (a multiple of 6), one CPU slot each")
    ap.add_argument("--images", type=int, default=600, help="training images per trial")
    ap.add_argument("--keep", type=Path, default=None, help="copy each run's sweep folder (logs, trials) here")
    args = ap.parse_args()
    if args.trials % 6:
        raise SystemExit("--trials must be a multiple of 6 (1, 2 and 3 nodes split it evenly)")
    with tempfile.TemporaryDirectory(prefix="vgg-xai-bench-", dir="/tmp") as tmp:
        root = Path(tmp)
        cache = tiny_cache(root, int(args.images / 0.8), 200)
        env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
        slurm_dir = Path(tempfile.mkdtemp(prefix="vgg-xai-bench-nodes-", dir="/tmp"))  # as local-slurm needs it
        env["VGG_XAI_SLURM_DIR"] = str(slurm_dir)
        t0 = time.monotonic()
        r = subprocess.run([str(LOCAL_SLURM), "start", "--nodes", "3", "--cpus", str(args.trials)], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(r.stderr)
        print(f"3-node SLURM started in {time.monotonic() - t0:.1f} s (each node offers {args.trials} CPUs)")
        env["SLURM_CONF"] = r.stdout.strip().splitlines()[-1].split("=", 1)[1]
        addrs = [line.split()[2] for line in (slurm_dir / "nodes").read_text().splitlines()]
        subnet = (slurm_dir / "net").read_text().split()[1]
        env["no_proxy"] = env["NO_PROXY"] = ",".join(["127.0.0.1,localhost", f"{subnet}.1", *addrs])
        try:
            rows = {n: one(env, root, cache, n, args.trials) for n in (1, 2, 3)}
            if args.keep:
                for n in rows:
                    shutil.copytree(root / f"n{n}", args.keep / f"n{n}", dirs_exist_ok=True)
        finally:
            subprocess.run([str(LOCAL_SLURM), "stop", "--purge"], env=env, capture_output=True)
            shutil.rmtree(slurm_dir, ignore_errors=True)
    base = rows[1]
    print(f"{args.trials} one-epoch trials of {args.images} images, {args.trials} CPU slots in all "
          f"({os.cpu_count()} cores)")
    print("nodes  hosts  submit->1st epoch  makespan  trial wall  overhead/trial  overhead vs 1 node")
    for n, r in rows.items():
        print(f"{n:>5}  {r['hosts']:>5}  {r['first_epoch_s']:>15.1f} s  {r['makespan_s']:>6.1f} s  "
              f"{r['trial_wall_s']:>8.1f} s  {r['overhead_per_trial_s']:>12.1f} s  "
              f"{r['overhead_per_trial_s'] / base['overhead_per_trial_s']:>17.2f}x")


if __name__ == "__main__":
    main()
