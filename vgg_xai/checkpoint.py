"""Checkpoints are plain dicts of tensors and builtins: written atomically, loaded weights_only.

Each checkpoint has its sha256 beside it, as hex in ``<name>.sha256`` (compare it with
``sha256sum checkpoint.pt``), and ``load`` checks it; the checkpoint file itself stays what
``torch.load(path, weights_only=True)`` reads. ``save(..., keep_previous=True)`` keeps the checkpoint
it replaces as ``<stem>.prev<suffix>`` (``checkpoint.prev.pt``) with its digest, for a trial to fall
back to when the latest one is damaged.

Every write here goes through ``atomic``'s temporary file and rename, so readers never see a
half-written checkpoint; a full disk raises ``DiskFull`` and leaves the target as it was.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

import torch

from .atomic import disk_full_named, fsync_dir, tmp_path, write_durably
from .errors import DamagedCheckpoint

# torch.save writes a zip archive; its end-of-central-directory record closes the file.
_ZIP_START, _ZIP_END, _ZIP_END_LEN = b"PK\x03\x04", b"PK\x05\x06", 22


def digest_path(path: str | Path) -> Path:
    """Where the sha256 of the checkpoint at ``path`` is kept: ``checkpoint.pt.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def previous_path(path: str | Path) -> Path:
    """Where ``save(..., keep_previous=True)`` keeps the checkpoint it replaces: ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save(obj: dict[str, Any], path: str | Path, keep_previous: bool = False) -> None:
    """Write ``obj`` to ``path`` with its digest beside it, atomically and durably.

    ``keep_previous``: the checkpoint at ``path``, if any, moves to ``previous_path(path)`` with its
    digest, replacing the one there. A full disk raises DiskFull before anything is renamed, so the
    checkpoints already there stay as they were.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    line = f"{hashlib.sha256(data).hexdigest()}\n".encode()
    side = digest_path(path)
    tmp, tmp_side = tmp_path(path), tmp_path(side)
    try:
        with disk_full_named(path, len(data) + len(line), tmp, tmp_side):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_durably(tmp, data)
            write_durably(tmp_side, line)
        # The renames keep every checkpoint file beside its own digest or beside none, so that a
        # crash between two of them never makes a good file look damaged.
        if keep_previous and path.exists():
            prev = previous_path(path)
            digest_path(prev).unlink(missing_ok=True)
            os.replace(path, prev)
            if side.exists():  # a checkpoint written before digests has none
                os.replace(side, digest_path(prev))
        side.unlink(missing_ok=True)
        os.replace(tmp, path)
        os.replace(tmp_side, side)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_side.unlink(missing_ok=True)


def discard(path: str | Path) -> None:
    """Remove the checkpoint at ``path`` and its digest, if there."""
    path = Path(path)
    path.unlink(missing_ok=True)
    digest_path(path).unlink(missing_ok=True)


def _truncation(data: bytes) -> str | None:
    """Why ``data`` looks cut short, or None when its end is there."""
    if not data:
        return "truncated: the file is empty"
    if data.startswith(_ZIP_START) and data[-_ZIP_END_LEN:-_ZIP_END_LEN + 4] != _ZIP_END:
        return f"truncated: {len(data)} bytes and the end of the archive is missing"
    return None


def _expected_digest(path: Path) -> str | None:
    side = digest_path(path)
    try:
        text = side.read_text(errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DamagedCheckpoint(path, f"its digest file {side.name} is unreadable: {e.strerror}") from e
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise DamagedCheckpoint(path, f"its digest file {side.name} holds no sha256")
    return text


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects, after checking it against its digest.

    Raises DamagedCheckpoint, naming the file, when it is truncated, differs from the digest written
    with it, or cannot be read or parsed; FileNotFoundError when it is not there. A checkpoint with
    no digest file (written before digests were kept) loads unverified: only damage that stops
    torch.load is noticed.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise
        raise DamagedCheckpoint(path, f"unreadable: {e.strerror}") from e
    expected = _expected_digest(path)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise DamagedCheckpoint(path, _truncation(data) or
                                f"digest mismatch: its {len(data)} bytes changed after it was written")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch makes of bytes it cannot parse, the file is at fault
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamagedCheckpoint(path, _truncation(data) or f"torch.load cannot read it: {first}") from e
