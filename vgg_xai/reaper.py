"""Stops what an embedded Ray leaves behind when its driver dies, however it dies.

Ray ties its GCS and raylet to the driver that started them (they die with it), but not the
agents the raylet starts: when the driver is killed, they find the raylet gone and then wait
60 s on the GCS, gone too, before they exit. The driver starts this watcher with a pipe on its
stdin; when the pipe closes (the driver shut Ray down, exited, or was killed), the watcher kills
the raylet's descendants it last saw and removes the Ray session's temp folder.

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
    seen: list[psutil.Process] = []
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # end of file: the driver is done with Ray
        try:
            seen = psutil.Process(raylet_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass  # the raylet went first: its descendants are the ones seen last
    for p in seen:
        try:
            p.kill()  # psutil refuses a PID that was reused by another process since
        except psutil.Error:
            pass
    psutil.wait_procs(seen, timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
