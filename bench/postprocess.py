"""Post-processing of one trial with 10,000 test vectors, step by step: the old settings beside the
new ones in the same run, and openTSNE (FFT and Barnes-Hut) against scikit-learn's TSNE
(Barnes-Hut) on the same features.

Trains one small trial first (width 0.125, one epoch on a train subset, the full test split) so
the features are a real model's. Then interprets it twice with this code:
    before  the old settings: faithfulness and the randomization check on the 10 probe images
            (one draw), t-SNE by FFT (openTSNE's own rule from 10,000 points);
    after   the defaults: faithfulness on 260 images, the check on 50 images x 3 draws, t-SNE by
            the method that is faster here (`embedding.tsne_method`);
and prints the wall and CPU seconds of every step and their ratio. CPU seconds (this process's,
all threads) say what a step costs when other work shares the machine; the load average is
printed beside them. Changes of code rather than settings show in both columns; two of them are
timed apart: the BIC scan in one thread against one per CPU, and t-SNE by each method. Run:
    python bench/postprocess.py --data ../shared/data/cifar10-jpeg.tar.gz   # or a prepared cache
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from vgg_xai.config import TrialConfig
from vgg_xai.data import prepare
from vgg_xai.features import read
from vgg_xai.interpret.clusters import bic_scan
from vgg_xai.interpret.embedding import available_cpus, opentsne_has_fftw, pca, tsne
from vgg_xai.postprocess import Settings, compute
from vgg_xai.train import run_trial

OLD = dict(faithfulness_per_class=1, sanity_per_class=1, sanity_draws=1, tsne_method="fft")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a CIFAR-10 source or a prepared cache (.h5)")
    ap.add_argument("--cache", default="results/data/cifar10.h5",
                    help="where to prepare a source (default: %(default)s)")
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--test-size", type=int, default=None, help="test vectors (default: all 10,000)")
    ap.add_argument("--skip-sklearn", action="store_true", help="do not time scikit-learn's TSNE (minutes)")
    args = ap.parse_args()

    data = Path(args.data)
    cache = data if data.suffix == ".h5" else prepare(data, args.cache)
    print(f"{available_cpus()} CPUs; openTSNE with FFTW: {opentsne_has_fftw()}; {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / "bench-trial"
        cfg = TrialConfig(data=str(cache), variant="bn", width=0.125, epochs=1, train_size=args.train_size,
                          valid_size=1000, test_size=args.test_size, device="cpu")
        t0 = time.perf_counter()
        result = run_trial(cfg, trial)
        print(f"trained one epoch on {args.train_size} images in {time.perf_counter() - t0:.1f} s "
              f"(test accuracy {result.test_acc:.3f})")
        n = len(read(trial / "features.h5").labels)

        runs = {}
        for name, settings in (("before", replace(Settings(), **OLD)), ("after", Settings())):
            _, m = compute(trial, settings)
            runs[name] = m
            print(f"{name}: done, {load()}", flush=True)
        before, after = runs["before"], runs["after"]
        print(f"\ninterpretation of one trial, {n} test vectors, seconds (wall | CPU of all threads):")
        print(f"  {'step':<14} {'before':>8} {'after':>8} {'ratio':>6}   {'before':>8} {'after':>8} {'ratio':>6}")
        rows = list(after["seconds"]) + ["total"]
        for key in ("seconds", "cpu_seconds"):
            for m in (before, after):
                m[key]["total"] = sum(m[key].values())
        for step in rows:
            wall = [before["seconds"][step], after["seconds"][step]]
            cpu = [before["cpu_seconds"][step], after["cpu_seconds"][step]]
            ratio = [f"{b / a:5.2f}x" if a > 0.005 else "     -" for b, a in (wall, cpu)]
            print(f"  {step:<14} {wall[0]:8.2f} {wall[1]:8.2f} {ratio[0]}   {cpu[0]:8.2f} {cpu[1]:8.2f} {ratio[1]}")
        print(f"  t-SNE method: before {before['tsne']['method']}, after {after['tsne']['method']}; "
              f"faithfulness images: before {before['summary']['faithfulness_n_images']}, "
              f"after {after['summary']['faithfulness_n_images']}; randomization check: before "
              f"{before['summary']['sanity_n_images']} images x {before['summary']['sanity_n_draws']} draw, after "
              f"{after['summary']['sanity_n_images']} images x {after['summary']['sanity_n_draws']} draws")
        for name, m in runs.items():
            print(f"summary {name}:", json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                  for k, v in m["summary"].items()}))

        feats = read(trial / "features.h5").features
        settings = Settings()
        z = pca(feats, settings.pca_dim, 0)[np.random.default_rng(0).permutation(len(feats))[: settings.bic_points]]
        fits = len(settings.bic_ks) * len(settings.bic_types)
        print(f"\nBIC scan ({fits} mixtures on {len(z)} vectors, one BLAS thread each), seconds ({load()}):")
        with threadpool_limits(1, user_api="blas"):
            for jobs in sorted({1, available_cpus()}):
                t0 = time.perf_counter()
                bic_scan(z, settings.bic_ks, settings.bic_types, 0, n_jobs=jobs)
                print(f"  {jobs} thread{'s' if jobs > 1 else ''}: {time.perf_counter() - t0:7.2f}")

        times = {}
        for method in ("fft", "bh"):
            t0 = time.perf_counter()
            tsne(feats, seed=0, method=method)
            times[f"openTSNE {method}"] = time.perf_counter() - t0
        if not args.skip_sklearn:
            from sklearn.manifold import TSNE

            t0 = time.perf_counter()
            TSNE(n_components=2, perplexity=30, random_state=0, n_jobs=-1).fit_transform(pca(feats, 50, 0))
            times["scikit-learn (Barnes-Hut)"] = time.perf_counter() - t0
        print(f"\nt-SNE of {n} vectors (PCA 50 first), seconds ({load()}):")
        for name, t in times.items():
            print(f"  {name:<28} {t:7.2f}")
        print(f"  ratio openTSNE fft / bh: {times['openTSNE fft'] / times['openTSNE bh']:.2f}x")
        if "scikit-learn (Barnes-Hut)" in times:
            sk = times["scikit-learn (Barnes-Hut)"]
            for method in ("fft", "bh"):
                print(f"  ratio scikit-learn / openTSNE {method}: {sk / times[f'openTSNE {method}']:.2f}x")


if __name__ == "__main__":
    main()
