"""What a sweep is doing: the live view of the driver, and `vgg-xai status` from anywhere.

Both read the same rows, one per trial: its state, epoch, accuracies, speed, where it runs and
what went wrong. The live view builds them from Tune's events; `status` reads them from the
trial folders and the sweep's own records (the driver lock, attempts.jsonl, SLURM's jobs.json),
without joining Ray, so it works from another terminal, during and after a sweep, local or
on SLURM. On a terminal both fit its height: a header with the sweep's progress, the running
trials, then the most recent finished ones; the full table is one `status` away.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from .locks import driver_of, pid_alive
from .trial_folder import CONFIG, ERROR, FINISHED, HISTORY, RESULT, TESTED, Damaged, read_attempts, read_config
from .trial_folder import read_history, read_result, trial_dirs
COLUMNS = ("trial", "status", "epoch", "train_acc", "valid_acc", "img/s", "eta", "where")


def duration(seconds: float | None) -> str:
    """42s, 4m05s, 1h05m: a length of time as people read it."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def new_row(trial_id: str, epochs: int) -> dict[str, Any]:
    return {"trial_id": trial_id, "status": "pending", "epoch": 0, "epochs": epochs, "train_acc": None,
            "valid_acc": None, "images_per_s": None, "epoch_s": [], "where": "", "note": "", "t": 0.0}


def _eta(row: dict[str, Any]) -> float | None:
    """Seconds the trial has left at its mean epoch time; None when unknown, or when nothing will run it
    (stopped: it has no time left until a sweep runs it again)."""
    if row["status"] not in ("running", "pending", "waiting") or not row["epoch_s"]:
        return None
    return max(0, row["epochs"] - row["epoch"]) * sum(row["epoch_s"]) / len(row["epoch_s"])


def progress_line(name: str, rows: list[dict[str, Any]], elapsed: float | None, driver: str = "") -> str:
    """sweep NAME: 3/15 done, 2 running, 9 pending, 1 failed · elapsed 1m05s · eta 4m10s

    Stopped trials (nothing runs them any more) are counted apart, where there are any:
    sweep NAME: 3/15 done, 0 running, 1 stopped, 10 pending, 1 failed"""
    count = lambda *states: sum(r["status"] in states for r in rows)  # noqa: E731
    done, running, stopped, failed = count(*FINISHED), count("running"), count("stopped"), count("failed")
    damaged = count("damaged")
    parts = [f"{done}/{len(rows)} done", f"{running} running"] + ([f"{stopped} stopped"] if stopped else []) + \
            [f"{len(rows) - done - running - stopped - failed - damaged} pending", f"{failed} failed"] + \
            ([f"{damaged} damaged"] if damaged else [])
    line = f"sweep {name}: " + ", ".join(parts)
    if elapsed is not None:
        line += f" · elapsed {duration(elapsed)}"
    # The sweep's ETA: the epochs left over all unfinished trials at the mean epoch time, shared by
    # the trials running at once.
    times = [s for r in rows for s in r["epoch_s"]]
    left = sum(max(0, r["epochs"] - r["epoch"]) for r in rows if r["status"] not in (*FINISHED, "failed", "damaged"))
    if times and left and running:
        line += f" · eta {duration(left * sum(times) / len(times) / running)}"
    return line + (f" · {driver}" if driver else "")


def _cells(r: dict[str, Any]) -> list[str]:
    acc = lambda v: f"{v:.3f}" if isinstance(v, float) and math.isfinite(v) else ""  # noqa: E731
    status = r["status"] + (f": {r['note']}" if r["note"] and r["status"] not in ("running",) else "")
    return [r["trial_id"], status, f"{r['epoch']}/{r['epochs']}", acc(r["train_acc"]), acc(r["valid_acc"]),
            f"{r['images_per_s']:.0f}" if r["images_per_s"] else "", duration(_eta(r)), r["where"]]


def table(rows: Iterable[dict[str, Any]], width: int | None = None) -> list[str]:
    """The rows as aligned text lines, each cut to ``width`` (a wrapped line would be two)."""
    body = [_cells(r) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(COLUMNS, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in [list(COLUMNS)] + body]
    return [x[:width] for x in lines] if width else lines


def fit(header: list[str], rows: list[dict[str, Any]], height: int, width: int, hint: str) -> list[str]:
    """At most ``height`` lines: the header, the running trials, then the most recently finished or
    failed ones, and a line that says how many are left out and where to see them all."""
    running = [r for r in rows if r["status"] == "running"]
    recent = sorted((r for r in rows if r["status"] in (*FINISHED, "failed")), key=lambda r: -r["t"])
    room = max(1, height - len(header) - 2)  # the column heads and the "more" line
    shown = (running + recent)[:room]
    order = {id(r): i for i, r in enumerate(rows)}
    shown.sort(key=lambda r: (r["status"] != "running", -r["t"] if r["status"] != "running" else order[id(r)]))
    more = len(rows) - len(shown)
    lines = header + table(shown, width)
    if more:
        lines.append(f"... {more} more ({hint})"[:width])
    return lines


def terminal_size(stream) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, AttributeError, ValueError):
        size = shutil.get_terminal_size()
    return size.lines, size.columns


class LiveTable:
    """The driver's view of its sweep: redrawn in place within the terminal, one line per event
    when the output is not a terminal (a log, a pipe)."""

    def __init__(self, name: str, rows: list[dict[str, Any]], stream=None, hint: str = ""):
        self.name = name
        self.rows = {r["trial_id"]: r for r in rows}
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.hint = hint
        self.start = time.time()
        self._drawn = 0

    def event(self, trial_id: str, event: str, result: dict[str, Any]) -> None:
        """One Tune event (see runtime.tune_grid)."""
        r = self.rows.setdefault(trial_id, new_row(trial_id, 0))
        r["t"] = time.time()
        if event == "start":
            r["status"] = "running"
        elif event == "retry":
            r["status"] = "retrying"
        elif event == "error":
            r["status"] = "failed"
        elif "done_status" in result:
            r["status"] = result["done_status"]
            r["epoch"] = result.get("epoch", r["epoch"])
        else:
            r.update(status="running", **{k: result[k] for k in ("epoch", "train_acc", "valid_acc", "images_per_s")})
            r["epoch_s"].append(result["seconds"])
        if self.tty:
            self.redraw()
        else:
            print(self.line(r), file=self.stream, flush=True)

    @staticmethod
    def line(r: dict[str, Any]) -> str:
        c = _cells(r)
        labels = ("train", "valid", "img/s", "eta")
        return "  ".join([c[0], c[1], f"epoch {c[2]}"] + [f"{k} {v}" for k, v in zip(labels, c[3:7]) if v])

    def render(self) -> list[str]:
        height, width = terminal_size(self.stream)
        rows = list(self.rows.values())
        head = [progress_line(self.name, rows, time.time() - self.start)[:width - 1]]
        return fit(head, rows, height - 1, width - 1, self.hint)

    def redraw(self) -> None:
        """Overwrite the lines drawn last, each cleared to its end, and blank the ones left over.
        No clearing of the screen: terminals that keep a cleared screen in their scrollback (tmux's
        scroll-on-clear) would keep a copy of the table each time."""
        lines = self.render()
        lines += [""] * max(0, self._drawn - len(lines))
        up = f"\r\x1b[{self._drawn}A" if self._drawn else ""
        self.stream.write(up + "".join(f"{line}\x1b[K\n" for line in lines))
        self.stream.flush()
        self._drawn = len(lines)


# ---------------------------------------------------------------------------- status from the folders

def _where(a: dict[str, Any]) -> str:
    """The last attempt's SLURM job (or array task) and the node it ran on; host:PID outside SLURM."""
    if a.get("slurm_job_id"):
        task = a.get("slurm_array_task_id")
        job = f"slurm {a.get('slurm_array_job_id') or a['slurm_job_id']}" + (f"_{task}" if task else "")
        return f"{job} on {a['host']}" if a.get("host") else job
    return f"{a.get('host', '?')}:{a.get('pid', '?')}"


def trial_row(trial_dir: Path, *, driver_alive: bool, jobs_active: bool) -> dict[str, Any]:
    """One trial's row read from its folder: a damaged file (or a folder without its config.json) makes
    it a `damaged` row whose note says which file, what is wrong and what to do."""
    try:
        return _trial_row(trial_dir, driver_alive, jobs_active)
    except Damaged as e:
        r = new_row(trial_dir.name, 0)
        r.update(status="damaged", note=str(e), t=0.0)
        return r


def _trial_row(trial_dir: Path, driver_alive: bool, jobs_active: bool) -> dict[str, Any]:
    from .results import trial_note

    cfg = read_config(trial_dir)
    if cfg is None:
        raise Damaged(trial_dir / CONFIG, "missing (an empty or half-copied trial folder)")
    r = new_row(trial_dir.name, int(cfg.get("epochs", 0)))
    history = read_history(trial_dir)
    if history:
        ok = [h for h in history if h.get("status") == "ok"]
        last = history[-1]
        r.update(epoch=len(ok), train_acc=last["train_acc"], valid_acc=last["valid_acc"],
                 images_per_s=last["images_per_s"], epoch_s=[h["seconds"] for h in ok],
                 t=(trial_dir / HISTORY).stat().st_mtime)
    try:
        attempts, unread = read_attempts(trial_dir), None
    except Damaged as e:  # it says where the trial runs: it matters only while the trial has no result
        attempts, unread = [], e
    attempt = attempts[-1] if attempts else None
    if attempt:
        r["where"] = _where(attempt)
    done = read_result(trial_dir)
    if done is not None:
        r["status"] = done["status"]
        r["t"] = (trial_dir / RESULT).stat().st_mtime
        if r["status"] in TESTED and done.get("test_acc") is not None:
            r["note"] = f"test {done['test_acc']:.3f}"
        if done.get("collapsed"):
            r["note"] += f"; stopped after epoch {done['epochs_completed']}: cannot learn again"
        return r
    if (trial_dir / ERROR).is_file():
        r.update(status="failed", note=trial_note(trial_dir, "failed"), t=(trial_dir / ERROR).stat().st_mtime)
        return r
    if unread is not None:
        raise unread
    if attempt is None:
        r["note"] = "" if driver_alive or jobs_active else "not started"
        return r
    here = attempt.get("host") == socket.gethostname()
    if here and not attempt.get("slurm_job_id"):
        alive = pid_alive(int(attempt.get("pid", 0)))
    else:  # elsewhere: running while its driver or its SLURM job is
        alive = driver_alive or jobs_active
    if alive:
        r["status"] = "running"
    elif driver_alive or jobs_active:
        r.update(status="waiting", note="to be retried")
    else:  # its process is gone: no process to show, and no time left until a sweep runs it again
        r.update(status="stopped", note=f"at epoch {r['epoch']}", where="")
    return r


COMMAND = "command.json"  # in the sweep folder: the command line that last ran the sweep, and where


def record_command(sweep_dir: Path, argv: list[str]) -> None:
    """Keep the command that runs the sweep (``vgg-xai sweep ...`` or ``vgg-xai submit ...``, with its
    --data and --set flags) and the folder it ran in, for `status` to print the command that continues it."""
    from .atomic import atomic_write_text

    atomic_write_text(Path(sweep_dir) / COMMAND, json.dumps({"argv": list(argv), "cwd": os.getcwd()}))


def continue_command(sweep_dir: Path) -> str | None:
    """The recorded command, as a shell line to copy, prefixed with a `cd` where it ran in another folder
    than this one (its paths may be relative); None where the sweep recorded none."""
    import shlex

    try:
        rec = json.loads((Path(sweep_dir) / COMMAND).read_text())
        argv, cwd = [str(x) for x in rec["argv"]], str(rec["cwd"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    line = shlex.join(argv)
    return line if Path(cwd) == Path.cwd() else f"cd {shlex.quote(cwd)} && {line}"


Jobs = Callable[[Path], tuple[list[str], bool]]  # a sweep folder -> its SLURM job lines, and whether any is queued


def no_jobs(sweep_dir: Path) -> tuple[list[str], bool]:
    return [], False


def status(sweep_dir: str | Path, height: int | None = None, width: int | None = None, jobs: Jobs = no_jobs) -> str:
    """`vgg-xai status`: the sweep's progress, its driver or SLURM jobs (``jobs``: see slurm.jobs_view),
    and a row per trial (all of them; or within ``height`` lines, as the live view does)."""
    from .errors import UserError

    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "trials").is_dir():
        raise UserError(f"{sweep_dir}: not a sweep folder (no trials/); pass results/<sweep>, e.g. results/smoke")
    driver = driver_of(sweep_dir)
    job_lines, active = jobs(sweep_dir)
    listed, outside = trial_dirs(sweep_dir)
    rows = [trial_row(d, driver_alive=driver is not None, jobs_active=active) for d in listed]
    if driver is not None:
        since = driver.get("since")
        who = f"driver PID {driver.get('pid', '?')} on {driver.get('host', '?')}"
        if since:
            who += f" since {time.strftime('%H:%M:%S', time.localtime(since))}"
    elif job_lines:
        who = "SLURM jobs queued or running" if active else "no SLURM job of this sweep is queued"
    else:
        who = "no driver running"
    elapsed = time.time() - driver["since"] if driver and driver.get("since") else None
    head = [progress_line(sweep_dir.name, rows, elapsed, who)] + job_lines
    unfinished = [r for r in rows if r["status"] not in FINISHED]
    if unfinished and driver is None and not active:
        left = f"{len(unfinished)} of {len(rows)} trials have no result and nothing is running them"
        command = continue_command(sweep_dir)
        if command:
            head += [f"{left}; to continue, run:", f"  {command}"]
        else:  # a sweep folder from before commands were recorded
            hint = "`vgg-xai submit` the same spec again" if job_lines else "run the same `vgg-xai sweep` command again"
            head.append(f"{left}; {hint}")
    if outside:
        names = ", ".join(d.name for d in outside[:4]) + (f", +{len(outside) - 4} more" if len(outside) > 4 else "")
        head.append(f"{len(outside)} trial folders outside the spec (kept on disk, left out of the tables): {names}")
    if height is None:
        return "\n".join(head + [""] + table(rows, width))
    return "\n".join(fit(head + [""], rows, height, width or 200, f"vgg-xai status {sweep_dir}"))


def watch(sweep_dir: str | Path, every: float = 2.0, stream=None, jobs: Jobs = no_jobs) -> None:
    """Redraw ``status`` every ``every`` seconds until Ctrl-C, or until nothing runs the sweep
    (no driver, no SLURM job queued). Not on a terminal: the full status each time."""
    stream = stream or sys.stdout
    tty = stream.isatty()
    while True:
        if tty:
            height, width = terminal_size(stream)
            text = status(sweep_dir, height - 1, width - 1, jobs)
            # Home, each line over the last frame's, then clear what is below (never the whole screen).
            stream.write("\x1b[H" + "".join(f"{line}\x1b[K\n" for line in text.splitlines()) + "\x1b[J")
        else:
            stream.write(status(sweep_dir, jobs=jobs) + "\n\n")
        stream.flush()
        if driver_of(Path(sweep_dir)) is None and not jobs(Path(sweep_dir))[1]:
            return
        time.sleep(every)
