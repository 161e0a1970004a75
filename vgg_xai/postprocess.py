"""The post-processing job: per sweep, the aggregate tables (and, per trial, the interpretation
suite). Idempotent; runs at the end of every sweep and as SLURM's job after the sweep job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UserError
from .results import write_tables


def postprocess(sweep_dir: str | Path) -> dict[str, Any]:
    """Write results/<sweep>/tables/ from the trial folders; returns the accuracy pivot."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "trials").is_dir():
        raise UserError(f"{sweep_dir}: not a sweep folder (no trials/); pass results/<sweep>")
    return write_tables(sweep_dir)
