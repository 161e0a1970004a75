"""The exception types a user sees: a problem with their input or their disk, and how to fix it."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input, or files or a disk in a state to fix. The CLI prints the message on one line and
    exits non-zero, no traceback.

    The message names the thing at fault (a path, a key) and what to do about it.
    """


def format_size(n: float) -> str:
    """A byte count as people read it: 830 B, 1.2 MB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            break
        n /= 1000
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"


class DiskFull(UserError):
    """A write ran out of disk space (or quota); the file it was replacing is left as it was.

    ``needed`` is the size of the file being written, or None when it was produced by a writer
    of unknown output size (then ``written`` is how far it got).
    """

    def __init__(self, folder: Path, name: str, needed: int | None, written: int, free: int,
                 quota: bool = False) -> None:
        self.folder, self.name, self.needed, self.written, self.free = Path(folder), name, needed, written, free
        self.quota = quota
        what = "disk quota exceeded in" if quota else "no space left in"
        need = format_size(needed) if needed is not None else f"more than {format_size(written)}"
        super().__init__(f"{what} {folder}: {name} needs {need}, {format_size(free)} free; "
                         "free space and run the same command again")

    def __reduce__(self) -> tuple[type, tuple]:
        # Rebuilt from its fields, not from its message: it crosses processes (Ray workers).
        return type(self), (self.folder, self.name, self.needed, self.written, self.free, self.quota)


class DamagedCheckpoint(UserError):
    """A checkpoint file that cannot be trusted: truncated, changed after it was written, or unreadable."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: damaged checkpoint ({reason}); restore it from a copy or train the trial again")

    def __reduce__(self) -> tuple[type, tuple]:
        return type(self), (self.path, self.reason)
