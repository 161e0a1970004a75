"""Atomic, durable writes: a temporary file beside the target, fsynced, then renamed over it.

Readers never see a half-written file, and a full disk raises ``DiskFull`` naming the file, what it
needed and what is free, with the target left as it was. No torch here: every module that writes a
small file uses these.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import DiskFull

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def disk_full_named(path: Path, size: int | None, *tmps: Path) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into DiskFull; its temporary files are removed first,
    so that the free space it reports is what a rerun will find."""
    try:
        yield
    except OSError as e:
        if e.errno not in _NO_SPACE:
            raise
        written = sum(t.stat().st_size for t in tmps if t.exists())
        for t in tmps:
            t.unlink(missing_ok=True)
        folder = path.parent
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        raise DiskFull(folder, path.name, size, written, shutil.disk_usage(existing).free,
                       quota=e.errno == errno.EDQUOT) from e


def write_durably(path: Path, data: bytes) -> None:
    # Plain writes, not torch.save to a path: a full disk then surfaces as OSError(ENOSPC) rather
    # than as torch's "unexpected pos" RuntimeError; fsync before the rename so that a crash
    # cannot leave the new name pointing at unwritten blocks.
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, write: Callable[[Path], object], size: int | None = None) -> None:
    """Call write(tmp_path), then rename tmp over path: readers never see a half-written file.

    ``size``, when known, is what a DiskFull message says the file needs.
    """
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with disk_full_named(path, size, tmp):
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    data = text.encode()
    atomic_write_bytes(path, lambda tmp: write_durably(tmp, data), len(data))
