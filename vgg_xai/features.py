"""The features.h5 schema: test-set feature vectors and predictions of one trained model.

One writer, one reader. Layout:
    /features     float32 (N, D)   the feature vector of each test image (input of the last Linear)
    /logits       float32 (N, 10)
    /labels       int64   (N,)
    /predictions  int64   (N,)
    /history/<column>     one 1-d dataset per history.csv column
    attrs: schema, config (JSON), classes (JSON), versions (JSON), git_commit, created,
           precision (the computation that made it: "fp32", the one the interpretation suite repeats)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .atomic import atomic_write_bytes

SCHEMA = "vgg-xai/features/1"


@dataclass
class FeatureDump:
    features: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray
    history: dict[str, np.ndarray]
    config: dict[str, Any]
    classes: list[str]
    versions: dict[str, str]
    git_commit: str
    precision: str = "fp32"  # "unknown" for a dump made before it was recorded


def write(path: str | Path, dump: FeatureDump) -> None:
    n = len(dump.labels)
    if not (len(dump.features) == len(dump.logits) == len(dump.predictions) == n):
        raise ValueError("features, logits, labels and predictions must have the same length")

    def _write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=np.asarray(dump.features, dtype=np.float32))
            f.create_dataset("logits", data=np.asarray(dump.logits, dtype=np.float32))
            f.create_dataset("labels", data=np.asarray(dump.labels, dtype=np.int64))
            f.create_dataset("predictions", data=np.asarray(dump.predictions, dtype=np.int64))
            h = f.create_group("history")
            for k, v in dump.history.items():
                arr = np.asarray(v)
                h.create_dataset(k, data=arr.astype("S") if arr.dtype.kind in "OU" else arr)
            f.attrs.update({
                "schema": SCHEMA, "config": json.dumps(dump.config, sort_keys=True),
                "classes": json.dumps(dump.classes), "versions": json.dumps(dump.versions, sort_keys=True),
                "git_commit": dump.git_commit, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "precision": dump.precision,
            })

    atomic_write_bytes(Path(path), _write)


def read(path: str | Path) -> FeatureDump:
    with h5py.File(path, "r") as f:
        if f.attrs.get("schema") != SCHEMA:
            raise ValueError(f"{path}: not a {SCHEMA} file (schema {f.attrs.get('schema')!r})")
        history = {}
        for k, ds in f["history"].items():
            v = ds[()]
            history[k] = v.astype(str) if v.dtype.kind == "S" else v
        return FeatureDump(
            features=f["features"][()], logits=f["logits"][()], labels=f["labels"][()],
            predictions=f["predictions"][()], history=history,
            config=json.loads(f.attrs["config"]), classes=json.loads(f.attrs["classes"]),
            versions=json.loads(f.attrs["versions"]), git_commit=str(f.attrs["git_commit"]),
            precision=str(f.attrs.get("precision", "unknown")),
        )


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The attributes alone, without the arrays: config and versions as dicts ({} where they do not parse),
    the others (schema, classes, git_commit, created, precision) as text. Raises OSError where the file
    does not open as HDF5."""
    with h5py.File(path, "r") as f:
        attrs: dict[str, Any] = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in f.attrs.items()}
    for k in ("versions", "config"):
        try:
            attrs[k] = json.loads(attrs.get(k, "{}"))
        except ValueError:
            attrs[k] = {}
    return attrs
