"""vgg_xai.reaper: what an embedded Ray would leave behind when its driver dies is stopped, in
whatever order the driver's processes die. A stand-in raylet (a process with two long-lived
children, the agents) is enough: the watcher knows nothing of Ray but the raylet's PID."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from vgg_xai.reaper import POLL_S

FAKE_RAYLET = r"""
import subprocess, sys
agents = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
          for _ in range(2)]
print(" ".join(str(a.pid) for a in agents), flush=True)
sys.stdin.readline()  # exits when told, its agents left to another parent
"""


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _until(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_the_agents_stop_even_where_the_raylet_was_last_seen_a_zombie(tmp_path):
    """A killed driver's raylet dies too, and its agents move to another parent at once; the raylet
    stays a zombie until its new parent reaps it, which on a loaded machine takes a while. A look
    at it then finds no children. The watcher must still stop the agents it saw before."""
    raylet = subprocess.Popen([sys.executable, "-c", FAKE_RAYLET], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    agents = [psutil.Process(int(pid)) for pid in raylet.stdout.readline().split()]
    temp = tmp_path / "ray-temp"
    temp.mkdir()
    reaper = subprocess.Popen([sys.executable, "-m", "vgg_xai.reaper", str(raylet.pid), str(temp)],
                              stdin=subprocess.PIPE, start_new_session=True)
    try:
        time.sleep(3 * POLL_S)  # the watcher has seen the agents
        raylet.stdin.write("\n")
        raylet.stdin.flush()
        # Not reaped here: the raylet stays a zombie, as under a parent that has not run yet.
        assert _until(lambda: psutil.Process(raylet.pid).status() == psutil.STATUS_ZOMBIE, 30)
        assert all(a.ppid() != raylet.pid for a in agents)
        time.sleep(3 * POLL_S)  # the watcher looks at the zombie: no children
        reaper.stdin.close()  # the driver is gone
        assert reaper.wait(timeout=60) == 0
        assert _until(lambda: not any(_alive(a) for a in agents), 10), [a.pid for a in agents if _alive(a)]
        assert not temp.exists()
    finally:
        for a in agents:
            if _alive(a):
                a.kill()
        raylet.wait()
        if reaper.poll() is None:
            reaper.kill()
            reaper.wait()
