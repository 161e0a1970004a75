"""A sweep folder damaged as a disk, a killed copy or an editor damages one: each class of damaged file
is one line from `status` and `results` (which file, what is wrong, what to do), that trial is shown as
damaged, every other trial is still read, and post-processing redoes an interpretation that does not
read. The folder is written by hand in the real formats."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import re
import socket
import time
from dataclasses import asdict
from pathlib import Path

import h5py
import pytest

from vgg_xai.cli import main
from vgg_xai.config import TrialConfig
from vgg_xai.train import HISTORY_COLUMNS, TrialResult

GOOD, BAD = "bn-lr1e-3-s0", "plain-lr1e-3-s0"


def trial(sweep: Path, variant: str, acc: float) -> Path:
    cfg = TrialConfig(variant=variant, lr_schedule="const_1e-3", seed=0, width=0.125, epochs=2, data="/c.h5")
    d = sweep / "trials" / cfg.trial_id
    d.mkdir(parents=True)
    (d / "config.json").write_text(cfg.to_json())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    w.writeheader()
    for e in (1, 2):
        w.writerow(dict(epoch=e, lr=1e-3, train_loss=1.0, train_acc=0.5, valid_loss=1.1, valid_acc=acc, seconds=2.0,
                        images_per_s=900.0, status="ok"))
    (d / "history.csv").write_text(buf.getvalue())
    (d / "attempts.jsonl").write_text(json.dumps({"attempt": 1, "host": socket.gethostname(), "pid": 1,
                                                 "start_epoch": 0, "time": time.time()}) + "\n")
    result = TrialResult(trial_id=cfg.trial_id, status="completed", epochs_completed=2, best_valid_acc=acc,
                         best_epoch=2, test_loss=1.0, test_acc=acc, wall_s=4.0)
    (d / "result.json").write_text(json.dumps(asdict(result)))
    return d


@pytest.fixture
def sweep(tmp_path) -> Path:
    s = tmp_path / "s"
    trial(s, "bn", 0.6)
    trial(s, "plain", 0.4)
    (s / "spec.yaml").write_text("name: s\n")
    return s


def _cut(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: text.index('"status": "compl') + 12])  # mid-string, as a full disk leaves it


def _unfinished(d: Path, attempts: bytes) -> None:
    """A trial without a result (its attempts.jsonl says where it runs), whose attempts.jsonl is damaged."""
    (d / "result.json").unlink()
    (d / "attempts.jsonl").write_bytes(attempts)


DAMAGE = {  # id: (how the bad trial's file is damaged, the words of the one line)
    "result.json cut mid-string": (lambda d: _cut(d / "result.json"), "result.json: not valid JSON (cut short?)"),
    "history.csv with a non-numeric row": (
        lambda d: (d / "history.csv").write_text((d / "history.csv").read_text() + "3,1e-3,x,0.5,1,0.5,2,900,ok\n"),
        "history.csv: line 4: train_loss is 'x', not a number"),
    "attempts.jsonl line that is a list": (
        lambda d: _unfinished(d, b"[1, 2]\n"), "attempts.jsonl: line 1 is a JSON list, not an object"),
    "attempts.jsonl with a non-integer PID": (
        lambda d: _unfinished(d, b'{"host": "h", "pid": "12a"}\n'),
        "attempts.jsonl: line 1: pid is '12a', not a whole number"),
    "attempts.jsonl of random bytes": (
        lambda d: _unfinished(d, os.urandom(64) + b"\xff"), "attempts.jsonl: not text"),
    "an empty trial folder": (
        lambda d: [p.unlink() for p in d.iterdir()], "config.json: missing (an empty or half-copied trial folder)"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_trial_file_is_one_line_and_the_others_are_read(case, sweep, capsys):
    damage, words = DAMAGE[case]
    damage(sweep / "trials" / BAD)
    assert main(["status", str(sweep)]) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0]
    assert head.startswith("sweep s: 1/2 done") and "1 damaged" in head, out  # the empty folder counts too
    if "attempts.jsonl" in case:
        assert "1/2 done, 0 running, 0 pending, 0 failed, 1 damaged" in head, head
    line = next(x for x in out.splitlines() if x.startswith(BAD))
    assert "damaged: " in line and words in line and str(sweep / "trials" / BAD) in line, line
    assert next(x for x in out.splitlines() if x.startswith(GOOD)).split()[1] == "completed:"  # test 0.600

    assert main(["results", str(sweep), "--sort", "test_acc", "--format", "csv"]) == 0
    rows = {r["trial_id"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert rows[GOOD]["test_acc"] == "0.6"
    if "attempts.jsonl" in case:  # where a trial ran is not a result: the tables read it as unfinished
        assert rows[BAD]["status"] == "pending"
        return
    assert rows[BAD]["status"] == "damaged"
    assert main(["results", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert f"not read: {BAD}: " in out and words in out  # under the pivot, which still has bn's cell
    assert "0.6000 n=1" in out


def test_a_damaged_metrics_file_is_named_and_redone(sweep, capsys):
    from vgg_xai.postprocess import SCHEMA, Settings, up_to_date

    out = sweep / "trials" / BAD / "interpret"
    out.mkdir()
    (out / "metrics.json").write_text('{"schema": "' + SCHEMA + '", "summary": {"ari": 0.')  # cut short
    with h5py.File(out / "arrays.h5", "w") as f:
        f.attrs["schema"] = SCHEMA
    assert main(["results", str(sweep), "--format", "json"]) == 0
    rows = {r["trial_id"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows[BAD]["status"] == "completed" and rows[BAD]["test_acc"] == 0.4  # the training's numbers stand
    assert rows[BAD]["interpretation"] == "damaged" and "metrics.json: not valid JSON" in rows[BAD]["note"]
    assert "run `vgg-xai postprocess` again" in rows[BAD]["note"]
    assert not up_to_date(sweep / "trials" / BAD, Settings())


def test_a_truncated_arrays_file_is_redone(sweep):
    """A metrics.json newer than everything, with the right schema and settings, beside an arrays.h5 cut
    short: not up to date (it was taken as up to date, and drawing the sweep's figures failed)."""
    from vgg_xai.postprocess import SCHEMA, Settings, up_to_date

    out = sweep / "trials" / GOOD / "interpret"
    out.mkdir()
    with h5py.File(out / "arrays.h5", "w") as f:
        f.attrs["schema"] = SCHEMA
        f.create_dataset("x", data=list(range(10_000)))
    (out / "metrics.json").write_text(json.dumps({"schema": SCHEMA, "settings": Settings().to_dict()}))
    assert up_to_date(sweep / "trials" / GOOD, Settings())
    data = (out / "arrays.h5").read_bytes()
    (out / "arrays.h5").write_bytes(data[: len(data) // 2])
    os.utime(out / "metrics.json")
    assert not up_to_date(sweep / "trials" / GOOD, Settings())


def test_a_held_lock_with_a_damaged_record_still_says_a_driver_holds_it(sweep, capsys):
    """The driver lock is held (flock) but its record has wrong types: status says a driver runs the
    sweep, with the fields it can read, instead of a TypeError."""
    lock = sweep.parent / f".{sweep.name}.driver"
    lock.write_text(json.dumps({"host": 7, "pid": "x", "since": "yesterday"}))
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert main(["status", str(sweep)]) == 0
        head = capsys.readouterr().out.splitlines()[0]
        assert "driver PID ? on ?" in head, head
    finally:
        os.close(fd)


JOBS_DAMAGE = {  # id: (what slurm/jobs.json holds, the words of the one line)
    "cut short": ('[{"submitted": 1.0, "mode": "array", "jobs": [{"role": "tri',
                  "jobs.json: not valid JSON (cut short?)"),
    "an object, not a list": ('{"jobs": []}', "jobs.json: the record is a JSON dict, not a list of submissions"),
    "a job id that is a number": ('[{"submitted": 1.0, "mode": "ray", "jobs": [{"role": "sweep", "job_id": 12}]}]',
                                  "jobs.json: submission 1: job {'role': 'sweep', 'job_id': 12} is not an object"),
}


@pytest.fixture(params=list(JOBS_DAMAGE))
def damaged_jobs(request, sweep) -> str:
    """The sweep's SLURM jobs record damaged; the words its one line holds."""
    text, words = JOBS_DAMAGE[request.param]
    (sweep / "slurm").mkdir()
    (sweep / "slurm" / "jobs.json").write_text(text)
    return words


def _one_line(out: str, words: str, sweep: Path) -> str:
    lines = [x for x in out.splitlines() if words in x]
    assert len(lines) == 1 and str(sweep / "slurm" / "jobs.json") in lines[0], out
    assert "restore it from a copy, or delete it" in lines[0] and "Traceback" not in out, out
    return lines[0]


def test_status_names_a_damaged_jobs_record_in_one_line_and_shows_the_trials(damaged_jobs, sweep, capsys):
    assert main(["status", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert _one_line(out, damaged_jobs, sweep).startswith("SLURM jobs not read: ")
    assert out.splitlines()[0].startswith("sweep s: 2/2 done"), out
    assert next(x for x in out.splitlines() if x.startswith(GOOD)).split()[1] == "completed:"


def test_logs_names_a_damaged_jobs_record_in_one_line_after_the_trial_log(damaged_jobs, sweep, capsys):
    (sweep / "trials" / GOOD / "trial.log").write_text("=== attempt 1 on h\nresult: completed\n")
    assert main(["logs", str(sweep), GOOD]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"==> trial.log: {sweep / 'trials' / GOOD / 'trial.log'} <==\n=== attempt 1 on h\n"), out
    assert _one_line(out, damaged_jobs, sweep).startswith("not read: ")


def test_cancel_stops_at_a_damaged_jobs_record_in_one_line(damaged_jobs, sweep, capsys):
    assert main(["cancel", str(sweep)]) == 2
    _one_line(capsys.readouterr().err, damaged_jobs, sweep)


def test_the_report_names_a_damaged_jobs_record_in_its_provenance(damaged_jobs, sweep):
    import html

    from vgg_xai.report import build_html

    page = html.unescape(build_html(sweep))
    row = re.search(r"<tr><td>SLURM</td><td>(.*?)</td></tr>", page).group(1)
    assert row.startswith("submitted: not read: ") and damaged_jobs in row and "restore it from a copy" in row
    assert f'id="t-{GOOD}"' in page and f'id="t-{BAD}"' in page  # the trials are all there
