"""`vgg-xai logs`: what one trial of a sweep wrote, wherever its attempts ran.

Its own log, ``trials/<id>/trial.log`` (every attempt's header, warnings, epochs, result or
traceback, written by train.run_trial), then, for a trial run as SLURM array tasks, what SLURM
caught of each task: submitit's ``slurm/<job>/<job>_<task>_log.out`` and ``.err`` for every job
recorded for the trial in ``slurm/jobs.json`` (one per `vgg-xai submit --mode array`).
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .trial_folder import ATTEMPTS, Damaged, read_jobs

SHOWN_IDS = 5  # trial ids named when the one asked for is not there


def _heading(what: str, path: Path) -> str:
    return f"==> {what}: {path} <=="


def _text(path: Path) -> str:
    text = path.read_text(errors="replace")
    return text if text.endswith("\n") or not text else text + "\n"


def _array_jobs(sweep_dir: Path, trial_id: str) -> list[str]:
    """The SLURM array tasks (job ids like 12_3) recorded for the trial, oldest submission first."""
    return [j["job_id"] for r in read_jobs(sweep_dir) for j in r["jobs"]
            if j["role"] == "trial" and j.get("trial_id") == trial_id]


def trial_logs(sweep_dir: str | Path, trial_id: str) -> str:
    """The trial's trial.log and its SLURM tasks' outputs, each under a heading."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir}: no such sweep folder; pass results/<sweep>, e.g. results/smoke")
    trials = sweep_dir / "trials"
    if not trials.is_dir():
        raise UserError(f"{sweep_dir}: not a sweep folder (no trials/); pass results/<sweep>, e.g. results/smoke")
    trial_dir = trials / trial_id
    if Path(trial_id).name != trial_id or trial_id in (".", "..") or not trial_dir.is_dir():
        known = sorted(d.name for d in trials.iterdir() if d.is_dir())
        named = ", ".join(known[:SHOWN_IDS]) + (f" and {len(known) - SHOWN_IDS} more" if len(known) > SHOWN_IDS else "")
        raise UserError(f"{trial_id}: no such trial in {sweep_dir} (its trials: {named or 'none'}; "
                        f"`vgg-xai status {sweep_dir}` lists them)")

    parts = []
    log = trial_dir / "trial.log"
    if log.is_file():
        parts.append(f"{_heading('trial.log', log)}\n{_text(log)}")
    try:
        jobs = _array_jobs(sweep_dir, trial_id)
    except Damaged as e:  # the trial's own log still shows; SLURM's outputs are under slurm/
        jobs = []
        parts.append(f"{_heading('SLURM array tasks', sweep_dir / 'slurm')}\nnot read: {e}\n")
    for job in jobs:
        folder = sweep_dir / "slurm" / job  # submitit's folder for array task A_i: slurm/A_i/
        files = sorted(folder.glob(f"{job}_*_log.out")) + sorted(folder.glob(f"{job}_*_log.err"))
        if not files:
            parts.append(f"{_heading(f'SLURM array task {job}', folder)}\n(no output yet: the task has not started)\n")
        for f in files:
            stream = "stdout" if f.suffix == ".out" else "stderr"
            parts.append(f"{_heading(f'SLURM array task {job}, {stream}', f)}\n{_text(f)}")
    if not parts:
        if (trial_dir / ATTEMPTS).is_file():
            raise UserError(f"{trial_dir}: no trial.log: the trial ran with a vgg-xai before trial logs; "
                            "its epochs are in history.csv")
        raise UserError(f"{trial_dir}: no log yet: the trial has not started")
    if not log.is_file():
        parts.insert(0, f"{_heading('trial.log', log)}\n(no log yet: the trial has not started training)\n")
    return "\n".join(parts)
