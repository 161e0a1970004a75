"""A trial's interpret/arrays.h5, everything its figures are drawn from: the one writer and reader.

The schema names the interpretation's version: metrics.json carries the same string, and
post-processing redoes a trial whose files were made by another version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .atomic import atomic_write_bytes

# 2: faithfulness paired with the random map; the ABS randomization statistic. 3: the reliability bins
# are stored (metrics/reliability), so that the figures are drawn from the arrays alone.
SCHEMA = "vgg-xai/interpret/3"


def write_arrays(path: Path, tree: dict[str, Any]) -> None:
    """A nested dict of arrays (and strings/lists as attributes) as one HDF5 file, atomically."""

    def put(group: h5py.Group, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                put(group.create_group(k), v)
            elif isinstance(v, (str, list, tuple)) and not isinstance(v, np.ndarray):
                group.attrs[k] = json.dumps(list(v) if isinstance(v, tuple) else v)
            else:
                group.create_dataset(k, data=np.asarray(v), compression="gzip", compression_opts=1)

    def _write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["schema"] = SCHEMA
            put(f, tree)

    atomic_write_bytes(path, _write)


def read_arrays(path: str | Path) -> dict[str, Any]:
    """What `write_arrays` wrote: datasets as arrays, attributes decoded from JSON."""

    def get(group: h5py.Group) -> dict[str, Any]:
        out: dict[str, Any] = {k: json.loads(v) for k, v in group.attrs.items() if k != "schema"}
        for k, v in group.items():
            out[k] = get(v) if isinstance(v, h5py.Group) else v[()]
        return out

    with h5py.File(path, "r") as f:
        if f.attrs.get("schema") != SCHEMA:
            raise ValueError(f"{path}: not a {SCHEMA} file")
        return get(f)


def schema(path: str | Path) -> Any:
    """The schema a file names (None where it names none); OSError where it does not open (cut short, damaged)."""
    with h5py.File(path, "r") as f:
        return f.attrs.get("schema")
