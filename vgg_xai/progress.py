"""Progress on a terminal as bars; in a log or a pipe (Ray workers, SLURM jobs, CI), a line per stage."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(**kwargs) -> tqdm:
    """A tqdm bar on stderr, disabled when stderr is not a terminal."""
    kwargs.setdefault("disable", not sys.stderr.isatty())
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(file=sys.stderr, **kwargs)


def stage(text: str) -> None:
    """One line on stderr saying what a long step is doing now, where stderr is not a terminal (a
    pipe, a log file) and so shows no bar; on a terminal the bars say it."""
    if not sys.stderr.isatty():
        print(text, file=sys.stderr, flush=True)
