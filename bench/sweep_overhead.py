"""Ray Tune's cost and gain: a sweep of N tiny trials against the same trials run one after
another in one process.

Prints the wall times, Ray's overhead per trial and the speed-up of 2 concurrent trials on
2 CPUs. Run:  python bench/sweep_overhead.py [--trials 6] [--epochs 2]
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray's start-up cloud-metadata probe goes to a closed loopback port.
os.environ.setdefault("http_proxy", "http://127.0.0.1:9")
os.environ.setdefault("no_proxy", "127.0.0.1,localhost")


def tiny_cache(root: Path, n_train: int, n_test: int) -> Path:
    """A random CIFAR-shaped data set in the official pickled format, prepared into a cache."""
    from vgg_xai.data import prepare

    rng = np.random.default_rng(0)
    src = root / "cifar-10-batches-py"
    src.mkdir()
    for i in range(1, 6):
        with open(src / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n_train // 5, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, n_train // 5).tolist()}, f)
    with open(src / "test_batch", "wb") as f:
        pickle.dump({b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                     b"labels": rng.integers(0, 10, n_test).tolist()}, f)
    with open(src / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return prepare(src, root / "cache.h5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--images", type=int, default=1000, help="training images per trial and epoch")
    args = ap.parse_args()

    import torch

    from vgg_xai import runtime, sweep
    from vgg_xai.config import JobSpec
    from vgg_xai.train import run_trial

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = tiny_cache(root, int(args.images / 0.8), 200)
        seeds = list(range(args.trials))
        spec = JobSpec.from_dict({
            "name": "bench", "data": {"source": str(cache)}, "model": {"width": 0.125},
            "grid": {"variant": ["bn"], "lr_schedule": ["const_1e-3"], "seed": seeds},
            "training": {"epochs": args.epochs}, "resources": {"cpu": 1}, "retries": 0,
            "results": str(root / "ray-results"),
        })
        trials = spec.trials(str(cache))
        print(f"{args.trials} trials x {args.epochs} epochs x {args.images} images, width 0.125, "
              f"{os.cpu_count()} CPUs")

        seq = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            for tid, cfg in trials:
                run_trial(cfg, root / f"seq{threads}" / tid)
            seq[threads] = time.perf_counter() - t0
            print(f"one process, one trial after another, {threads} thread(s): {seq[threads]:7.1f} s "
                  f"({seq[threads] / args.trials:.1f} s a trial)", flush=True)

        t0 = time.perf_counter()
        runtime.ray_init()
        start_up = time.perf_counter() - t0
        t1 = time.perf_counter()
        sweep.run(sweep.plan(spec), stream=io.StringIO())  # joins the Ray started above
        ray_wall = time.perf_counter() - t1
        runtime.ray_shutdown()  # and its watcher, whose pipe ray.shutdown() alone leaves open
        concurrent = min(os.cpu_count() or 1, args.trials)
        ideal = seq[1] / concurrent
        print(f"Ray start-up (once per sweep): {start_up:5.1f} s")
        print(f"Ray Tune sweep, 1 CPU a trial ({concurrent} at once), after start-up: {ray_wall:7.1f} s")
        print(f"Ray overhead per trial: {(ray_wall - ideal) * concurrent / args.trials:5.2f} s "
              f"(against {concurrent} perfectly parallel one-thread trials)")
        total = ray_wall + start_up
        print(f"speed-up of the sweep (start-up included) over one thread, one after another: {seq[1] / total:5.2f}x; "
              f"over both threads in one process: {seq[2] / total:5.2f}x")


if __name__ == "__main__":
    main()
