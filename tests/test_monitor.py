"""The live view and `vgg-xai status`: what fits a terminal, what a pipe gets, what a folder says.

A real sweep followed by `status` from another process is in test_sweep.py
(test_one_ctrl_c_stops_the_sweep_quietly_and_the_rerun_continues).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vgg_xai.monitor import LiveTable, duration, new_row

REPO = Path(__file__).resolve().parents[1]

DEMO = """
import sys, time
from vgg_xai.monitor import LiveTable, new_row

n = int(sys.argv[1])
table = LiveTable("demo", [new_row(f"trial-{i:02d}", 2) for i in range(n)], sys.stdout,
                  hint="vgg-xai status results/demo")
for i in range(n):  # 3 events a trial: 90 redraws for 30 trials
    t = f"trial-{i:02d}"
    table.event(t, "start", {})
    table.event(t, "result", {"epoch": 1, "train_acc": 0.1, "valid_acc": 0.1, "images_per_s": 800.0, "seconds": 1.0})
    table.event(t, "result", {"done_status": "completed", "epoch": 2})
print("DEMO-DONE", flush=True)
time.sleep(120)
"""


def test_duration_reads_as_people_write_it():
    assert [duration(s) for s in (0, 42, 65, 3599, 3900, 90000)] == ["0s", "42s", "1m05s", "59m59s", "1h05m",
                                                                     "25h00m"]
    assert duration(None) == "" and duration(float("nan")) == ""


def test_piped_output_is_one_line_per_event():
    out = io.StringIO()
    table = LiveTable("demo", [new_row("a", 2), new_row("b", 2)], out)
    table.event("a", "start", {})
    table.event("a", "result", {"epoch": 1, "train_acc": 0.5, "valid_acc": 0.25, "images_per_s": 100.0,
                                "seconds": 3.0})
    table.event("a", "result", {"done_status": "completed", "epoch": 2})
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\x1b" not in out.getvalue()
    assert lines[1] == "a  running  epoch 1/2  train 0.500  valid 0.250  img/s 100  eta 3s"
    assert lines[2].startswith("a  completed  epoch 2/2")  # the epoch a finished trial reached, never 0


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (Debian: apt-get install tmux)")
def test_a_30_trial_table_in_a_20_row_terminal_leaves_no_stale_copies(tmp_path):
    """A real terminal (tmux, 100 x 20): everything the table ever drew, scrollback included, holds one
    header, and the screen ends with the sweep's progress and the most recent trials."""
    script = tmp_path / "demo.py"
    script.write_text(DEMO)
    sock = f"vgg-xai-test-{secrets.token_hex(4)}"  # a tmux server of this test's own
    tmux = ["tmux", "-L", sock, "-f", "/dev/null"]
    subprocess.run([*tmux, "new-session", "-d", "-x", "100", "-y", "20", "-s", "demo",
                    f"cd {REPO} && {sys.executable} {script} 30"], check=True)
    try:
        end = time.monotonic() + 120
        while True:
            shown = subprocess.run([*tmux, "capture-pane", "-p", "-t", "demo", "-S", "-", "-E", "-"],
                                   capture_output=True, text=True, check=True).stdout
            if "DEMO-DONE" in shown:
                break
            assert time.monotonic() < end, shown
            time.sleep(0.3)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    drawn = shown[:shown.index("DEMO-DONE")].rstrip("\n").splitlines()
    assert sum(line.startswith("sweep demo:") for line in drawn) == 1, shown
    assert sum(line.startswith("trial ") for line in drawn) == 1, shown
    assert len(drawn) <= 19, shown
    assert drawn[0].startswith("sweep demo: 30/30 done, 0 running, 0 pending, 0 failed"), shown
    assert "trial-29" in drawn[2] and drawn[-1].startswith("... 14 more (vgg-xai status results/demo)"), shown
    assert all(len(line) <= 99 for line in drawn)


def test_status_of_a_folder_that_is_not_a_sweep_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vgg_xai.cli", "status", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a sweep folder" in r.stderr, r.stderr


def test_status_reads_a_sweep_nobody_runs(tmp_path):
    """Trial folders as a stopped sweep leaves them: one finished, two stopped part-way (one last run
    elsewhere, one by a process of this host that has exited), one failed, one never started."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a real PID of this host whose process is gone
    trials = tmp_path / "s" / "trials"
    hist = "epoch,lr,train_loss,train_acc,valid_loss,valid_acc,seconds,images_per_s,status\n"
    for tid, files in {
        "a": {"result.json": json.dumps({"status": "completed", "test_acc": 0.5}),
              "history.csv": hist + "1,0.001,2.0,0.4,2.0,0.45,10.0,100.0,ok\n2,0.001,1.0,0.5,1.5,0.55,10.0,100.0,ok\n"},
        "b": {"history.csv": hist + "1,0.001,2.0,0.3,2.0,0.35,20.0,50.0,ok\n",
              "attempts.jsonl": json.dumps({"host": "elsewhere", "pid": 1, "start_epoch": 0}) + "\n"},
        "c": {"error.txt": "Traceback ...\nRuntimeError: boom\n"},
        "d": {},
        "e": {"history.csv": hist + "1,0.001,2.0,0.3,2.0,0.35,20.0,50.0,ok\n",
              "attempts.jsonl": json.dumps({"host": socket.gethostname(), "pid": gone.pid, "start_epoch": 0}) + "\n"},
    }.items():
        (trials / tid).mkdir(parents=True)
        (trials / tid / "config.json").write_text(json.dumps({"epochs": 2, "variant": "bn", "lr_schedule": "x",
                                                              "seed": 0}))
        for name, text in files.items():
            (trials / tid / name).write_text(text)
    r = subprocess.run([sys.executable, "-m", "vgg_xai.cli", "status", str(tmp_path / "s")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # the stopped trials are neither pending nor running, and the sweep, with nothing running, has no ETA
    assert lines[0] == "sweep s: 1/5 done, 0 running, 2 stopped, 1 pending, 1 failed · no driver running"
    assert lines[1] == "4 of 5 trials have no result and nothing is running them; run the same `vgg-xai sweep` " \
                       "command again"
    row = {line.split()[0]: line for line in lines[3:]}
    assert row["a"].split()[1:5] == ["completed:", "test", "0.500", "2/2"]
    for tid in ("b", "e"):  # no ETA and no process: nothing runs it
        assert row[tid].split() == [tid, "stopped:", "at", "epoch", "1", "1/2", "0.300", "0.350", "50"], r.stdout
    assert "elsewhere" not in r.stdout and f":{gone.pid}" not in r.stdout
    assert "failed: RuntimeError: boom" in row["c"]
    assert row["d"].split()[1:4] == ["pending:", "not", "started"]


def test_status_prints_the_command_that_continues_the_sweep(tmp_path, monkeypatch):
    """The command a sweep recorded, as the CLI records it from its arguments (--force-new left out:
    it would start over), printed to paste: as is in the folder it ran in, after a `cd` elsewhere."""
    from vgg_xai.cli import _spec_command, build_parser
    from vgg_xai.monitor import record_command

    sweep, work = tmp_path / "results" / "s", tmp_path / "work"
    (sweep / "trials" / "a").mkdir(parents=True)
    (sweep / "trials" / "a" / "config.json").write_text(json.dumps({"epochs": 2}))
    work.mkdir()
    args = build_parser().parse_args(["sweep", "jobs/smoke.yaml", "--data", "../data/cifar 10.tar.gz", "--force-new",
                                      "--set", "grid.variant=[bn, plain]", "--set", "training.epochs=1"])
    monkeypatch.chdir(work)
    record_command(sweep, _spec_command("sweep", args))
    command = "vgg-xai sweep jobs/smoke.yaml --data '../data/cifar 10.tar.gz' --set 'grid.variant=[bn, plain]' " \
              "--set training.epochs=1"
    for cwd, line in ((work, f"  {command}"), (tmp_path, f"  cd {work} && {command}")):
        r = subprocess.run([sys.executable, "-m", "vgg_xai.cli", "status", str(sweep)], capture_output=True,
                           text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[1:3] == ["1 of 1 trials have no result and nothing is running them; to continue, run:", line]
