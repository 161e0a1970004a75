"""The driver lock of a sweep folder and the lock of a trial's interpretation, on real flocks: a held lock
refuses a second driver in one line naming the holder, a dead holder's lock is taken over, and a record
damaged or of the wrong types still gives one line, not a traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vgg_xai.errors import UserError
from vgg_xai.locks import driver_of, driving, locked

HOLD = """
import sys, time
from pathlib import Path
from vgg_xai.locks import driving

with driving(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def _lock_file(sweep: Path) -> Path:
    return sweep.parent / f".{sweep.name}.driver"


@pytest.fixture
def holder(tmp_path):
    """Another process that holds the driver lock of tmp_path/s until it is killed."""
    sweep = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(sweep)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        yield sweep, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)


def test_a_held_lock_refuses_a_second_driver_in_one_line_naming_the_holder(holder):
    sweep, proc = holder
    assert driver_of(sweep)["pid"] == proc.pid
    with pytest.raises(UserError) as e:
        with driving(sweep):
            raise AssertionError("a second driver got the lock")
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{sweep}: another driver is running this sweep (PID {proc.pid} on "
                                                f"{socket.gethostname()}, since ")
    assert line.endswith("wait for it to finish or stop it, then run the same command again")


def test_a_dead_holders_lock_is_taken_over(holder):
    sweep, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert _lock_file(sweep).is_file() and json.loads(_lock_file(sweep).read_text())["pid"] == proc.pid
    assert driver_of(sweep) is None  # the kernel dropped the flock with its holder
    with driving(sweep):
        record = json.loads(_lock_file(sweep).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert driver_of(sweep)["pid"] == os.getpid()
    assert driver_of(sweep) is None


@pytest.mark.parametrize("record, shown", [
    (json.dumps({"host": 7, "pid": "x", "since": "yesterday"}), "PID ? on ?, since ?"),
    (json.dumps({"host": "h", "pid": 12, "since": True}), "PID 12 on h, since ?"),
    (json.dumps([1, 2]), "PID ? on ?, since ?"),
    ('{"host": "h", "pi', "PID ? on ?, since ?"),
    (b"\xff\xfe\x00garbage", "PID ? on ?, since ?"),
])
def test_a_held_lock_with_a_damaged_record_is_one_line(record, shown, tmp_path):
    """The lock held by another open file (as another process holds it) over a record of the wrong shape or
    types: the refusal reads the fields it can and is one line; status's view gets only those fields."""
    import fcntl

    sweep = tmp_path / "s"
    path = _lock_file(sweep)
    path.write_bytes(record if isinstance(record, bytes) else record.encode())
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = driver_of(sweep)
        assert view is not None and all(isinstance(view[k], t) for k, t in (("host", str), ("pid", int)) if k in view)
        with pytest.raises(UserError) as e:
            with driving(sweep):
                raise AssertionError("the lock was taken from its holder")
        assert f"another driver is running this sweep ({shown})" in str(e.value) and "\n" not in str(e.value)
    finally:
        os.close(fd)
    assert path.read_bytes() == (record if isinstance(record, bytes) else record.encode())  # left as it was


def test_a_trial_lock_waits_for_its_holder(tmp_path):
    path = tmp_path / "trial" / ".interpret.lock"
    entered = threading.Event()

    def second() -> None:
        with locked(path):
            entered.set()

    with locked(path):
        t = threading.Thread(target=second)
        t.start()
        assert not entered.wait(0.3)  # blocked while the first holds it
    assert entered.wait(10)
    t.join(10)


def test_no_lock_file_no_driver(tmp_path):
    assert driver_of(tmp_path / "s") is None
    t0 = time.time()
    with driving(tmp_path / "s"):
        record = json.loads(_lock_file(tmp_path / "s").read_text())
    assert record["pid"] == os.getpid() and t0 <= record["since"] <= time.time()
