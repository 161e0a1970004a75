"""The small files of a trial folder: their names, one reader each, and a trial's state.

    config.json     the trial's settings (TrialConfig)
    result.json     written once the trial has finished: status (completed | diverged | collapsed), its numbers
    history.csv     one row per epoch (HISTORY_COLUMNS)
    attempts.jsonl  one JSON object per attempt to train it: host, pid, start epoch, time, Ray, SLURM
    error.txt       the last attempt's error, where every attempt failed

and the sweep-level record beside them (in the sweep folder):

    slurm/jobs.json every SLURM submission of the sweep, oldest first: its time, mode and jobs

Each file has one writer here too (atomic: a temporary file, then a rename; attempts.jsonl is appended
a line at a time). Every reader has one policy for a damaged file (cut short by a full disk or a killed
copy, garbage bytes, a record of the wrong shape or with values of the wrong type): it raises `Damaged`,
whose one line names the file, what is wrong with it and what to do. A table or a status view shows that trial
as `damaged` with that line and reads every other trial. A missing file is not damage: it is None
(or no rows), as for a trial that has not got so far.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .errors import UserError

CONFIG, RESULT, HISTORY, ATTEMPTS, ERROR = "config.json", "result.json", "history.csv", "attempts.jsonl", "error.txt"
CHECKPOINT = "checkpoint.pt"  # the latest epoch's (checkpoint.py writes and reads checkpoints)
FINISHED = ("completed", "diverged", "collapsed")
# Finished trials that were tested on the test set: a collapsed trial stopped early but is tested like
# every trial (at chance), and flagged degenerate wherever it is shown.
TESTED = ("completed", "collapsed")
# The numeric columns of history.csv; the last column, status, is ok or diverged.
HISTORY_NUMBERS = ("epoch", "lr", "train_loss", "train_acc", "valid_loss", "valid_acc", "seconds", "images_per_s")
HISTORY_COLUMNS = [*HISTORY_NUMBERS, "status"]
# What to do about each file when it is damaged.
FIX = {
    CONFIG: "run the sweep command again to write it anew",
    RESULT: "delete it and run the sweep command again: the trial finishes again from its last checkpoint",
    HISTORY: "restore it from a copy, or delete the trial folder and run the sweep command again to retrain it",
    ATTEMPTS: "restore it from a copy, or delete it (it records where the trial ran, not its results)",
    "metrics.json": "run `vgg-xai postprocess` again: it redoes an interpretation that does not read",
    "jobs.json": "restore it from a copy, or delete it (it records which SLURM jobs ran the sweep; "
                 "sacct still lists them)",
}


class Damaged(UserError):
    """A trial or sweep file that does not read as what it should be; str() is the one line to show
    (a command that cannot go on without the file stops with it, as with any UserError)."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}; {FIX.get(path.name, 'restore it or delete it')}")
        self.path, self.why = path, why

    def __reduce__(self) -> tuple[type, tuple]:
        return type(self), (self.path, self.why)


def _text(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise Damaged(path, f"not text (byte {e.start} is not UTF-8)") from None
    except OSError as e:
        raise Damaged(path, f"cannot be read ({e.strerror})") from None


def _json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        cut = " (cut short?)" if "Unterminated" in str(e) or "Expecting" in str(e) else ""
        raise Damaged(path, f"not valid JSON{cut}: {e}") from None


def _json_object(path: Path, text: str, what: str) -> dict[str, Any]:
    d = _json(path, text)
    if not isinstance(d, dict):
        raise Damaged(path, f"{what} is a JSON {type(d).__name__}, not an object")
    return d


def _number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _read_object(path: Path, what: str) -> tuple[Path, dict[str, Any] | None]:
    text = _text(path)
    return path, None if text is None else _json_object(path, text, what)


def read_config(trial_dir: Path) -> dict[str, Any] | None:
    """config.json as a dict (variant, lr_schedule, seed, epochs checked for their types); None if missing."""
    path, d = _read_object(trial_dir / CONFIG, "the settings")
    if d is None:
        return None
    for key, types in (("variant", str), ("lr_schedule", str), ("seed", int), ("epochs", int)):
        if key in d and (not isinstance(d[key], types) or isinstance(d[key], bool)):
            raise Damaged(path, f"{key} is {d[key]!r}, not a {types.__name__}")
    return d


def read_result(trial_dir: Path) -> dict[str, Any] | None:
    """result.json as a dict (status one of FINISHED, its numbers numbers or null); None if missing."""
    path, d = _read_object(trial_dir / RESULT, "the result")
    if d is None:
        return None
    if d.get("status") not in FINISHED:
        raise Damaged(path, f"status is {d.get('status')!r}, not one of {', '.join(FINISHED)}")
    for key in ("epochs_completed", "best_valid_acc", "best_epoch", "test_loss", "test_acc", "wall_s"):
        if not _number(d.get(key)):
            raise Damaged(path, f"{key} is {d[key]!r}, not a number")
    if not isinstance(d.get("collapsed"), (str, type(None))):
        raise Damaged(path, f"collapsed is {d['collapsed']!r}, not a reason (a string)")
    return d


def read_history(trial_dir: Path) -> list[dict[str, Any]]:
    """history.csv's rows, numbers as floats ([] where there is none yet)."""
    path = trial_dir / HISTORY
    text = _text(path)
    if text is None:
        return []
    rows = list(csv.DictReader(text.splitlines()))
    out = []
    for i, row in enumerate(rows, 2):  # line 1 is the header
        try:
            parsed = {k: float(row[k]) for k in HISTORY_NUMBERS}
        except KeyError as e:
            raise Damaged(path, f"no column {e.args[0]} (line {i})") from None
        except (TypeError, ValueError):
            bad = next((k for k in HISTORY_NUMBERS if not _parses(row.get(k))), "?")
            raise Damaged(path, f"line {i}: {bad} is {row.get(bad)!r}, not a number") from None
        out.append({**row, **parsed})
    return out


def _parses(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def read_attempts(trial_dir: Path) -> list[dict[str, Any]]:
    """attempts.jsonl's records, one per attempt ([] where there is none yet); each a JSON object whose
    pid and start_epoch are whole numbers and host a string."""
    path = trial_dir / ATTEMPTS
    text = _text(path)
    if text is None:
        return []
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        a = _json_object(path, line, f"line {i}")
        for key, types in (("pid", int), ("start_epoch", int), ("host", str)):
            if key in a and (not isinstance(a[key], types) or isinstance(a[key], bool)):
                kind = "whole number" if types is int else "string"
                raise Damaged(path, f"line {i}: {key} is {a[key]!r}, not a {kind}")
        if "time" in a and not (_number(a["time"]) and a["time"] is not None and math.isfinite(a["time"])):
            raise Damaged(path, f"line {i}: time is {a['time']!r}, not a number")
        out.append(a)
    return out


def state(trial_dir: Path) -> str:
    """completed | diverged | collapsed (result.json), failed (error.txt), running (a checkpoint: started) or pending;
    raises Damaged where result.json does not read."""
    result = read_result(trial_dir)
    if result is not None:
        return result["status"]
    if (trial_dir / ERROR).is_file():
        return "failed"
    return "running" if (trial_dir / CHECKPOINT).is_file() else "pending"


def finished(trial_dir: Path) -> bool:
    """The trial has a result; a damaged result.json is not one (the trial finishes again from its checkpoint)."""
    try:
        return read_result(trial_dir) is not None
    except Damaged:
        return False


def write_config(trial_dir: Path, config_json: str) -> None:
    """config.json: the trial's settings as TrialConfig.to_json() gives them."""
    atomic_write_text(Path(trial_dir) / CONFIG, config_json)


def write_result(trial_dir: Path, result: dict[str, Any]) -> None:
    """result.json, strict JSON: an undefined number (a diverged trial's test accuracy) is null, not NaN."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}
    atomic_write_text(Path(trial_dir) / RESULT, json.dumps(clean, indent=2, allow_nan=False))


def write_history(trial_dir: Path, rows: list[dict[str, Any]]) -> None:
    """history.csv, every row so far (HISTORY_COLUMNS)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(Path(trial_dir) / HISTORY, buf.getvalue())


def append_attempt(trial_dir: Path, record: dict[str, Any]) -> None:
    """One line of attempts.jsonl: who runs this attempt, where, from which epoch."""
    with open(Path(trial_dir) / ATTEMPTS, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_error(trial_dir: Path, text: str) -> None:
    """error.txt: the last attempt's error, where every attempt failed."""
    atomic_write_text(Path(trial_dir) / ERROR, text)


def trial_dirs(sweep_dir: Path) -> tuple[list[Path], list[Path]]:
    """The sweep's trial folders, sorted: (those its spec lists, those outside it). The spec is the one
    spec.yaml recorded at the last run (its ``trials``); a sweep that recorded none lists every folder."""
    import yaml

    folders = Path(sweep_dir, "trials")
    found = sorted(d for d in folders.iterdir() if d.is_dir()) if folders.is_dir() else []
    try:
        listed = (yaml.safe_load((Path(sweep_dir) / "spec.yaml").read_text()) or {}).get("trials")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        listed = None  # no record (a pulled table, an older sweep) or one that does not read: every folder
    if not isinstance(listed, list):
        return found, []
    names = set(map(str, listed))
    return [d for d in found if d.name in names], [d for d in found if d.name not in names]


# ---------------------------------------------------------------------------- the sweep's records

JOBS = "slurm/jobs.json"


def read_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """slurm/jobs.json's submissions, oldest first ([] for a sweep never submitted): each an object with
    submitted (a time), mode and jobs, a list of objects whose role and job_id (and trial_id, for an array
    task) are strings."""
    path = Path(sweep_dir) / JOBS
    text = _text(path)
    if text is None:
        return []
    record = _json(path, text)
    if not isinstance(record, list):
        raise Damaged(path, f"the record is a JSON {type(record).__name__}, not a list of submissions")
    for i, sub in enumerate(record, 1):
        if not isinstance(sub, dict) or not isinstance(sub.get("jobs"), list):
            raise Damaged(path, f"submission {i} is not an object with a list of jobs")
        for j in sub["jobs"]:
            if not (isinstance(j, dict) and isinstance(j.get("role"), str) and isinstance(j.get("job_id"), str)
                    and isinstance(j.get("trial_id", ""), str)):
                raise Damaged(path, f"submission {i}: job {j!r} is not an object with a role and a job_id (strings)")
    return record


def add_submission(sweep_dir: Path, mode: str, jobs: list[dict[str, str]]) -> None:
    """Append one submission (its jobs: role, job_id, and trial_id for an array task) to slurm/jobs.json."""
    record = read_jobs(sweep_dir)
    record.append({"submitted": time.time(), "mode": mode, "jobs": jobs})
    atomic_write_text(Path(sweep_dir) / JOBS, json.dumps(record, indent=2))
