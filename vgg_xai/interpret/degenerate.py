"""Is a trained model's result degenerate? Checks on the numbers the suite is computed from.

A model whose training collapsed (plain VGG at a high learning rate: every ReLU dead) gives every
test image the same feature vector and the same output, and its class activation maps are all
zero. The analyses of such a model still return numbers, but the numbers mean nothing: t-SNE of
identical points, a mixture fitted to one point, the AUC of a pixel order taken from an empty
map. These checks say so where the numbers are made; the caller records them and skips what
they make meaningless. Each check returns plain numbers (the "checks") and one line per finding
(the "reasons").
"""

from __future__ import annotations

import numpy as np

# Below this spread, relative to the vectors' size, feature vectors count as the same: float32
# rounding between identical computations is about 1e-7, a model that tells images apart is far
# above 1e-2 (a learning trial after one epoch: 0.3).
NEAR_CONSTANT = 1e-4
# A set of maps is degenerate when at least this share of them is flat (all zero or constant).
FLAT_SHARE = 0.5
# Maps in [0, 1] that differ nowhere by more than this are the same map: those of a model whose
# output ignores its input differ by float rounding, about 1e-6 after min-max scaling (measured).
SAME_MAP = 1e-3


def relative_spread(x: np.ndarray) -> float:
    """How much rows of ``x`` (N, D) differ, relative to their size: the root of the total
    variance over the root mean squared norm. 0 when every row is the same (also all zero)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    spread = np.sqrt(x.var(axis=0).sum())
    size = np.sqrt((x ** 2).sum(axis=1).mean())
    return float(spread / size) if size > 0 else 0.0


def distinct_rows(x: np.ndarray) -> int:
    """The number of different rows of ``x`` (N, D), bit for bit."""
    x = np.ascontiguousarray(x).reshape(len(x), -1)
    return int(len(np.unique(x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))))))


def feature_checks(features: np.ndarray, logits: np.ndarray, predictions: np.ndarray,
                   classes: list[str]) -> tuple[dict, list[str]]:
    """Checks of the test-set feature vectors (N, D), logits (N, C) and predictions (N,).

    checks: ``feature_std`` (largest standard deviation of a feature over the images),
    ``feature_spread`` and ``logit_spread`` (`relative_spread`), ``distinct_features``,
    ``predicted_classes`` (how many classes are predicted at all), ``top_class_share`` (share of
    images given the most predicted class) and ``top_class``.
    """
    f = np.asarray(features, dtype=np.float64)
    preds = np.asarray(predictions, dtype=np.int64)
    counts = np.bincount(preds, minlength=len(classes))
    top = int(counts.argmax())
    checks = {
        "feature_std": float(f.std(axis=0).max()), "feature_spread": relative_spread(f),
        "distinct_features": distinct_rows(features), "logit_spread": relative_spread(logits),
        "predicted_classes": int((counts > 0).sum()), "top_class_share": float(counts[top] / len(preds)),
        "top_class": classes[top],
    }
    reasons = []
    if checks["distinct_features"] == 1:
        reasons.append(f"every test image gets the same feature vector (feature std {checks['feature_std']:.3g})")
    elif collapsed(checks):
        reasons.append(f"the test images' feature vectors are nearly identical (relative spread "
                       f"{checks['feature_spread']:.2g}, {checks['distinct_features']} distinct)")
    if checks["predicted_classes"] == 1:
        reasons.append(f"one predicted class for all {len(preds)} test images ({checks['top_class']})")
    return checks, reasons


def collapsed(checks: dict) -> bool:
    """The feature vectors of `feature_checks` are all the same, or nearly so."""
    return checks["distinct_features"] == 1 or checks["feature_spread"] < NEAR_CONSTANT


def insensitive(checks: dict) -> bool:
    """The model's output of `feature_checks` is the same for every test image, or nearly so."""
    return checks["logit_spread"] < NEAR_CONSTANT


def flat_maps(maps: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """Per map of ``maps`` (N, H, W): True where it is all zero or constant (max - min <= tol
    times its largest magnitude, or <= tol)."""
    m = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    span = m.max(axis=1) - m.min(axis=1)
    return span <= tol * np.maximum(1.0, np.abs(m).max(axis=1))


def map_checks(maps: np.ndarray, key: str) -> dict:
    """Checks of a set of maps (N, H, W): ``{key}_maps`` (how many), ``{key}_flat_maps`` (all
    zero or constant), ``{key}_zero_maps`` and ``{key}_identical_maps`` (every map the same)."""
    m = np.asarray(maps, dtype=np.float64)
    flat = flat_maps(m)
    return {f"{key}_maps": int(len(m)), f"{key}_flat_maps": int(flat.sum()),
            f"{key}_zero_maps": int((np.abs(m).reshape(len(m), -1).max(axis=1) == 0).sum()),
            f"{key}_identical_maps": bool(len(m) > 1 and np.allclose(m, m[:1], rtol=0, atol=SAME_MAP))}


def degenerate_maps(checks: dict, key: str) -> bool:
    """The maps of `map_checks` are mostly flat (at least `FLAT_SHARE` of them), or all the same."""
    return checks[f"{key}_flat_maps"] >= FLAT_SHARE * checks[f"{key}_maps"] or checks[f"{key}_identical_maps"]


def maps_finding(checks: dict, key: str) -> str:
    """What is wrong with degenerate maps, in a few words: "8 of 10 all zero", "all 10 the same"."""
    n, flat, zero = checks[f"{key}_maps"], checks[f"{key}_flat_maps"], checks[f"{key}_zero_maps"]
    if flat >= FLAT_SHARE * n:
        return f"{flat} of {n} all zero" if zero == flat else f"{flat} of {n} all zero or constant"
    return f"all {n} the same map"
