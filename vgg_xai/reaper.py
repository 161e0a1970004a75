"""Stops what an embedded Ray leaves behind when its driver dies, however it dies.

Ray ties its GCS and raylet to the driver that started them (they die with it), but not the
agents the raylet starts: when the driver is killed, they find the raylet gone and then wait
60 s on the GCS, gone too, before they exit. The driver starts this watcher with a pipe on its
stdin; when the pipe closes (the driver shut Ray down, exited, or was killed), the watcher kills
every descendant of the raylet it has seen that still runs, and removes the Ray session's temp
folder.

Every one it has seen, not the last look alone: when the driver is killed, the raylet dies with it,
and its children go to another parent at once while the raylet itself may stay a zombie for a while
(its new parent reaps it when it gets to run: later on a loaded machine). A look taken then finds a
raylet without children; had it replaced the earlier ones, the agents would live on for their
minute.

Run as ``python -m vgg_xai.reaper RAYLET_PID TEMP_DIR`` (see ``runtime.ray_init``).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys

import psutil

POLL_S = 1.0  # how often the raylet's descendants are looked at while the driver lives


def watch(raylet_pid: int, temp_dir: str) -> None:
    # Signals meant for the driver's job (SLURM's USR2 warning, its TERM at requeue, a hang-up) would
    # end the watcher before its work; it ends when the pipe closes, or by SIGKILL.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    seen: dict[int, psutil.Process] = {}
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # end of file: the driver is done with Ray
        seen = {pid: p for pid, p in seen.items() if p.is_running()}  # is_running: not a reused PID
        seen.update((p.pid, p) for p in _descendants(raylet_pid))
    for p in seen.values():
        try:
            p.kill()  # psutil refuses a PID that was reused by another process since
        except psutil.Error:
            pass
    psutil.wait_procs(list(seen.values()), timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _descendants(pid: int) -> list[psutil.Process]:
    """The processes below ``pid``; none where it is gone or a zombie (its children have moved on)."""
    try:
        p = psutil.Process(pid)
        return [] if p.status() == psutil.STATUS_ZOMBIE else p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
