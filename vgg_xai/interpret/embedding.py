"""Low-dimensional views of feature vectors: PCA, and t-SNE (openTSNE, Barnes-Hut or FFT)."""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
from sklearn.decomposition import PCA


def pca(x: np.ndarray, n_components: int = 50, seed: int = 0) -> np.ndarray:
    """The first ``n_components`` principal-component scores (N, k), k capped by the data's shape."""
    x = np.asarray(x, dtype=np.float64)
    k = min(n_components, *x.shape)
    return PCA(n_components=k, random_state=seed).fit_transform(x)


def tsne(x: np.ndarray, seed: int = 0, perplexity: float = 30, n_jobs: int | None = None,
         method: str = "auto") -> np.ndarray:
    """A 2-d t-SNE embedding (N, 2) of ``x``; features of more than 50 dimensions are first
    reduced to 50 by PCA (the usual practice: it removes noise and makes the neighbour search
    cheap). Perplexity is capped at (N - 1) / 3 so small sets still work. ``n_jobs``: threads
    (default: the CPUs this process may use).

    ``method``: the negative-gradient approximation, ``fft`` (interpolation, linear in N),
    ``bh`` (Barnes-Hut) or ``auto`` (`tsne_method`: the one that is faster here).

    Vectors that are not finite, or all the same, are refused with a ValueError: openTSNE would
    turn them into NaN (its initialization divides by their spread) and its gradient code can
    crash the process on NaN.
    """
    from openTSNE import TSNE  # heavy import, only needed here

    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"t-SNE: {int((~np.isfinite(x)).any(axis=1).sum())} of {len(x)} vectors are not finite")
    if len(x) < 2 or not (np.ptp(x, axis=0) > 0).any():
        raise ValueError(f"t-SNE: all {len(x)} vectors are the same; there is nothing to embed")
    if x.shape[1] > 50:
        x = pca(x, 50, seed)
        if not np.isfinite(x).all():
            raise ValueError("t-SNE: the principal components of the vectors are not finite")
    perplexity = min(perplexity, (len(x) - 1) / 3)
    emb = TSNE(n_components=2, perplexity=perplexity, negative_gradient_method=tsne_method(len(x), method),
               n_jobs=n_jobs or available_cpus(), random_state=seed).fit(x)
    return np.asarray(emb)


def tsne_method(n: int, method: str = "auto") -> str:
    """The t-SNE gradient method for ``n`` points: ``method`` itself unless it is ``auto``.

    ``auto`` picks what is faster where this runs. Below 10,000 points Barnes-Hut (FFT's fixed
    grid cost dominates: 1,000 points, 18 s against 1.9 s). From 10,000 points (a full test set)
    FFT only where openTSNE was built with FFTW: with numpy's FFT in its place, as in the pip
    wheels, FFT took 2.3-2.4x as long as Barnes-Hut at 10,000 points on 2 idle cores (measured; see
    bench/postprocess.py).
    """
    if method != "auto":
        return method
    return "fft" if n >= 10_000 and opentsne_has_fftw() else "bh"


@lru_cache(maxsize=1)
def opentsne_has_fftw() -> bool:
    """Whether openTSNE's FFT is FFTW's: its matrix-multiply extension then calls FFTW's
    planner; the build without FFTW (numpy's FFT, the pip wheels) has no such symbol."""
    try:
        from openTSNE._matrix_mul import matrix_mul

        with open(matrix_mul.__file__, "rb") as f:
            return b"fftw_plan" in f.read()
    except (ImportError, OSError):
        return False


def available_cpus() -> int:
    """The CPUs this process may use (a SLURM or Ray allotment), not every core of the node."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
