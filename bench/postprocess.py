"""Post-processing of one trial with 10,000 test vectors, step by step, and openTSNE (FFT and
Barnes-Hut) against scikit-learn's TSNE (Barnes-Hut) on the same features.

Trains one small trial first (width 0.125, one epoch on a train subset, the full test split) so
the features are a real model's. Prints the seconds of every step of the interpretation suite
and the t-SNE ratio. Run:
    python bench/postprocess.py --data ../shared/data/cifar10-jpeg.tar.gz   # or a prepared cache
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from vgg_xai.config import TrialConfig
from vgg_xai.data import prepare
from vgg_xai.features import read
from vgg_xai.interpret.embedding import pca, tsne
from vgg_xai.postprocess import Settings, compute
from vgg_xai.train import run_trial


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a CIFAR-10 source or a prepared cache (.h5)")
    ap.add_argument("--cache", default="results/data/cifar10.h5", help="where to prepare a source (default: %(default)s)")
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--test-size", type=int, default=None, help="test vectors (default: all 10,000)")
    ap.add_argument("--skip-sklearn", action="store_true", help="do not time scikit-learn's TSNE (minutes)")
    args = ap.parse_args()

    data = Path(args.data)
    cache = data if data.suffix == ".h5" else prepare(data, args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / "bench-trial"
        cfg = TrialConfig(data=str(cache), variant="bn", width=0.125, epochs=1, train_size=args.train_size,
                          valid_size=1000, test_size=args.test_size)
        t0 = time.perf_counter()
        result = run_trial(cfg, trial)
        print(f"trained one epoch on {args.train_size} images in {time.perf_counter() - t0:.1f} s "
              f"(test accuracy {result.test_acc:.3f})")

        _, metrics = compute(trial, Settings())
        n = len(read(trial / "features.h5").labels)
        print(f"\ninterpretation of one trial, {n} test vectors (seconds):")
        for step, s in metrics["seconds"].items():
            print(f"  {step:<14} {s:8.2f}")
        print(f"  {'total':<14} {sum(metrics['seconds'].values()):8.2f}")
        print("summary:", json.dumps({k: round(v, 4) for k, v in metrics["summary"].items()}))

        feats = read(trial / "features.h5").features
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
        print(f"\nt-SNE of {n} vectors (PCA 50 first), seconds:")
        for name, t in times.items():
            print(f"  {name:<28} {t:7.2f}")
        if "scikit-learn (Barnes-Hut)" in times:
            sk = times["scikit-learn (Barnes-Hut)"]
            for method in ("fft", "bh"):
                print(f"  ratio scikit-learn / openTSNE {method}: {sk / times[f'openTSNE {method}']:.2f}x")


if __name__ == "__main__":
    main()
