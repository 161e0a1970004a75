"""Checkpoints are plain dicts of tensors and builtins: written atomically, loaded weights_only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp over path: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))


def save(obj: dict[str, Any], path: str | Path) -> None:
    atomic_write_bytes(Path(path), lambda tmp: torch.save(obj, tmp))


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)
