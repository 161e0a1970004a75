"""File locks: one driver per sweep folder, one interpreter per trial.

Both are flocks, which the kernel drops when their holder dies however it dies, so a dead
holder's lock is free at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


def _lock_path(sweep_dir: Path) -> Path:
    # Beside the sweep folder, not in it: --force-new moves the folder aside while the lock is held.
    return sweep_dir.parent / f".{sweep_dir.name}.driver"


# The holder record's fields and their types; a field of another type (a damaged record) reads as unknown.
_HOLDER_TYPES = {"host": str, "pid": int, "since": (int, float)}


def _holder(path: Path) -> dict[str, Any]:
    """The lock's record of its holder (host, pid, since); {} where it does not read, and only the fields of
    the right type where some are damaged."""
    try:
        h = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(h, dict):
        return {}
    return {k: v for k, v in h.items() if k in _HOLDER_TYPES and isinstance(v, _HOLDER_TYPES[k])
            and not isinstance(v, bool)}


def _describe_holder(h: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"])) if "since" in h else "?"
    return f"PID {h.get('pid', '?')} on {h.get('host', '?')}, since {since}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def driving(sweep_dir: Path) -> Iterator[None]:
    """Hold the sweep folder's driver lock for the block: one driver per sweep, on any host.

    The lock is a flock, which the kernel drops when the driver dies however it dies, so a dead
    driver's lock is free at once; its file names the holder (host, PID, start) for the refusal.
    Where the file system has no flock (ENOLCK), the record alone decides: a holder on this host
    whose PID is gone is stale and taken over.
    """
    path = _lock_path(Path(sweep_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{sweep_dir}: another driver is running this sweep ({_describe_holder(_holder(path))}); "
                            "wait for it to finish or stop it, then run the same command again") from None
        except OSError as e:
            if e.errno != errno.ENOLCK:
                raise
            h = _holder(path)
            stale = not h or (h.get("host") == me["host"] and not pid_alive(int(h.get("pid", 0))))
            if not stale and h.get("pid") != me["pid"]:
                raise UserError(f"{sweep_dir}: another driver is running this sweep ({_describe_holder(h)}); wait for "
                                f"it, or delete {path} if that driver is gone") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the flock


def driver_of(sweep_dir: Path) -> dict[str, Any] | None:
    """The driver running the sweep now (its host, PID and start), or None when none is.

    Read without taking the lock from anyone: a shared lock that cannot be had means a driver holds
    it. Where the file system has no flock, the record decides as in ``driving``.
    """
    path = _lock_path(Path(sweep_dir))
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(path) or {}
        except OSError as e:
            if e.errno != errno.ENOLCK:
                raise
            h = _holder(path)
            alive = h and (h.get("host") != socket.gethostname() or pid_alive(int(h.get("pid", 0))))
            return h if alive else None
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` held for the block (waits for another holder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
