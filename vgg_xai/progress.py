"""Progress bars on a terminal, silence in logs (Ray workers, SLURM jobs, CI)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(**kwargs) -> tqdm:
    """A tqdm bar on stderr, disabled when stderr is not a terminal."""
    kwargs.setdefault("disable", not sys.stderr.isatty())
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(file=sys.stderr, **kwargs)
