"""Which test images the per-image interpretations (filters, CAMs, faithfulness) look at."""

from __future__ import annotations

import numpy as np


def probe_indices(labels: np.ndarray, seed: int = 0, per_class: int = 1) -> np.ndarray:
    """Indices into ``labels``: ``per_class`` of every class 0..max(labels), drawn by ``seed``.

    Ordered by class, ascending index within a class, so figures read class by class and the
    same seed picks the same images for every model of a sweep.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError("labels: expected a non-empty 1-d array of class ids")
    rng = np.random.default_rng(seed)
    out = []
    for c in range(int(labels.max()) + 1):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} image(s); per_class={per_class} needs more")
        out.append(np.sort(rng.choice(idx, size=per_class, replace=False)))
    return np.concatenate(out).astype(np.int64)
