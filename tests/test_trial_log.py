"""A trial's own output: trial.log (every attempt), `vgg-xai logs`, TensorBoard event files, the
error.txt of a failed trial, and the lines `vgg-xai data prepare` prints where stderr is not a terminal."""

from __future__ import annotations

import csv
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vgg_xai.config import TrialConfig
from vgg_xai.data import STAGE
from vgg_xai.errors import UserError
from vgg_xai.train import run_trial

TAGS = {"loss/train": "train_loss", "loss/valid": "valid_loss", "accuracy/train": "train_acc",
        "accuracy/valid": "valid_acc", "lr": "lr"}
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  "


def _cfg(cache, **kw) -> TrialConfig:
    base = dict(data=str(cache), arch="simple_cnn", variant="bn", width=0.125, epochs=3, batch_size=64,
                precision="fp32", device="cpu")
    return TrialConfig(**{**base, **kw})


class Stop(Exception):
    pass


def _stop_after(epoch: int):
    def report(m, _ckpt):
        if m["epoch"] == epoch:
            raise Stop(f"stopped after epoch {epoch}")
    return report


def _attempts(log: Path) -> list[list[str]]:
    """trial.log split into attempts, each a list of lines without their time stamps."""
    out: list[list[str]] = []
    for line in log.read_text().splitlines():
        text = re.sub(f"^{STAMP}", "", line)
        if text.startswith("=== attempt "):
            out.append([])
        out[-1].append(text)
    return out


def _history(trial_dir: Path) -> list[dict[str, str]]:
    with open(trial_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _check_events(trial_dir: Path) -> None:
    """The event files hold every epoch of history.csv once, under each tag, with its values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = trial_dir / "tensorboard"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0}, purge_orphaned_data=False)  # all, as written
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == sorted(TAGS)
    rows = _history(trial_dir)
    for tag, key in TAGS.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [int(r["epoch"]) for r in rows], tag
        assert [e.value for e in events] == [pytest.approx(float(r[key]), rel=1e-6) for r in rows], tag


# ---------------------------------------------------------------------------- trial.log and TensorBoard

def test_every_attempt_is_logged_and_the_events_follow_the_history(tiny_cache, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    cfg = _cfg(tiny_cache, compile=True)  # compile: ignored on the CPU, with a warning
    with pytest.raises(Stop):
        run_trial(cfg, tmp_path, report=_stop_after(2))
    # The latest checkpoint is damaged: the next attempt falls back to epoch 1's and repeats epoch 2,
    # which the first attempt wrote to TensorBoard already.
    with open(tmp_path / "checkpoint.pt", "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    monkeypatch.setenv("SLURM_JOB_ID", "125")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("VGG_XAI_NODE", "10.0.0.3")
    result = run_trial(cfg, tmp_path, resume=True)
    assert result.status == "completed" and result.epochs_completed == 3

    # stderr as before: the two warnings, once each
    err = capsys.readouterr().err
    warnings = [x for x in err.splitlines() if x.startswith("vgg-xai: warning: ")]
    assert len(warnings) == 2 and "is damaged (truncated" in warnings[0] and "compile:" in warnings[1], err

    first, second = _attempts(tmp_path / "trial.log")
    assert re.fullmatch(rf"=== attempt 1 on \S+ \(PID {os.getpid()}\): start epoch 1 of 3", first[0]), first[0]
    assert first[1] == "warning: compile: torch.compile is used on CUDA only; ignored on cpu"
    assert [x.split()[1] for x in first if x.startswith("epoch ")] == ["1", "2"]
    failed = first.index("failed:")
    assert first[failed + 1] == "Traceback (most recent call last):"
    assert first[-1].endswith("Stop: stopped after epoch 2")

    assert re.fullmatch(rf"=== attempt 2 on \S+ \(PID {os.getpid()}, SLURM job 125, array task 120_3, "
                        r"Ray node 10\.0\.0\.3\): start epoch 2 of 3 \(resumed from checkpoint\.prev\.pt\)",
                        second[0]), second[0]
    assert second[1] == warnings[0].replace("vgg-xai: ", "", 1)
    epochs = [x for x in second if x.startswith("epoch ")]
    assert [x.split()[1] for x in epochs] == ["2", "3"]
    row = _history(tmp_path)[-1]  # the line has the numbers of history.csv
    assert epochs[-1].startswith(f"epoch   3  lr {float(row['lr']):.0e}  train {float(row['train_loss']):.4f} / "
                                 f"{float(row['train_acc']):.3f}  valid {float(row['valid_loss']):.4f} / "
                                 f"{float(row['valid_acc']):.3f}  ")
    assert second[-1].startswith(f"result: completed, 3 of 3 epochs good; best valid {result.best_valid_acc:.4f} "
                                 f"at epoch {result.best_epoch}; test {result.test_acc:.4f}; ")
    _check_events(tmp_path)

    # A failure before the attempt knows where it starts is logged too.
    with pytest.raises(UserError, match="differs in width"):
        run_trial(cfg.replace(width=0.25), tmp_path, resume=True)
    third = _attempts(tmp_path / "trial.log")[2]
    assert third[0].startswith("=== attempt 3 on ") and third[0].endswith("failed before it knew its start epoch")
    assert third[1] == "failed:" and "differs in width" in third[-1]
    assert json.loads((tmp_path / "config.json").read_text())["width"] == 0.125  # still the checkpoint's


def test_resumed_with_every_epoch_done_counts_them_all(tiny_cache, tmp_path):
    """The attempt that only evaluates (the one before stopped after its last checkpoint) reports all
    the trial's epochs as completed, not the none it trained itself."""
    pytest.importorskip("tensorboard")
    cfg = _cfg(tiny_cache, epochs=2)
    with pytest.raises(Stop):
        run_trial(cfg, tmp_path, report=_stop_after(2))
    assert not (tmp_path / "result.json").exists()
    result = run_trial(cfg, tmp_path, report=lambda m, c: pytest.fail("no epoch is left to train"), resume=True)
    assert result.status == "completed" and result.epochs_completed == 2
    assert json.loads((tmp_path / "result.json").read_text())["epochs_completed"] == 2
    last = _attempts(tmp_path / "trial.log")[-1]
    assert last[0].endswith(": all 2 epochs trained earlier (resumed from checkpoint.pt)")
    assert last[1].startswith("result: completed, 2 of 2 epochs good; ")
    _check_events(tmp_path)


def test_tensorboard_is_optional_and_never_fails_a_trial(tiny_cache, tmp_path, capsys, monkeypatch):
    cfg = _cfg(tiny_cache, epochs=1)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
        assert run_trial(cfg, tmp_path / "without").status == "completed"
    assert not list((tmp_path / "without").rglob("events.out.tfevents.*"))
    assert "warning" not in capsys.readouterr().err

    pytest.importorskip("tensorboard")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tensorboard").write_text("not a folder")
    assert run_trial(cfg, tmp_path / "broken").status == "completed"
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("vgg-xai: warning: tensorboard: ")]
    assert line.endswith("; no more event files in this attempt")
    assert line.replace("vgg-xai: ", "", 1) in _attempts(tmp_path / "broken" / "trial.log")[0]


# ---------------------------------------------------------------------------- vgg-xai logs

TRIAL = "bn-lr1e-3-s0"


@pytest.fixture(scope="module")
def sweep(tiny_cache, tmp_path_factory) -> Path:
    """A sweep folder with one trial trained for real, its two array tasks' SLURM outputs where submitit
    puts them (the second one not started); a trial whose array task ran but never trained (no
    trial.log); a trial never started."""
    from submitit.core.utils import JobPaths

    root = tmp_path_factory.mktemp("sweep")
    run_trial(_cfg(tiny_cache, epochs=2), root / "trials" / TRIAL)
    for never in ("plain-lr1e-3-s0", "l2-lr1e-3-s0"):
        (root / "trials" / never).mkdir()
        (root / "trials" / never / "config.json").write_text("{}")
    jobs = [{"submitted": 1.0, "mode": "array",
             "jobs": [{"role": "trial", "job_id": "120_0", "trial_id": TRIAL},
                      {"role": "trial", "job_id": "120_1", "trial_id": "plain-lr1e-3-s0"},
                      {"role": "postprocess", "job_id": "121"}]},
            {"submitted": 2.0, "mode": "array",
             "jobs": [{"role": "trial", "job_id": "130_0", "trial_id": TRIAL},
                      {"role": "postprocess", "job_id": "131"}]}]
    (root / "slurm").mkdir()
    (root / "slurm" / "jobs.json").write_text(json.dumps(jobs))
    for job in ("120_0", "120_1"):  # 130_0 has not started: no files
        paths = JobPaths(root / "slurm" / "%j", job_id=job, task_id=0)
        paths.folder.mkdir(parents=True)
        paths.stdout.write_text(f"stdout of {job}\n")
        paths.stderr.write_text(f"stderr of {job}\nTraceback: the end\n")
    return root


def _logs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vgg_xai.cli", "logs", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_logs_prints_the_trial_log_then_its_slurm_tasks(sweep):
    r = _logs(sweep, TRIAL)
    assert r.returncode == 0, r.stderr
    log = sweep / "trials" / TRIAL / "trial.log"
    slurm = sweep / "slurm"
    assert r.stdout == (
        f"==> trial.log: {log} <==\n{log.read_text()}\n"
        f"==> SLURM array task 120_0, stdout: {slurm / '120_0' / '120_0_0_log.out'} <==\nstdout of 120_0\n\n"
        f"==> SLURM array task 120_0, stderr: {slurm / '120_0' / '120_0_0_log.err'} <==\n"
        "stderr of 120_0\nTraceback: the end\n\n"
        f"==> SLURM array task 130_0: {slurm / '130_0'} <==\n(no output yet: the task has not started)\n")
    assert "=== attempt 1 on " in r.stdout and "epoch   2  lr 1e-03" in r.stdout and "result: completed" in r.stdout

    # Its array task ran, but the trial never got to train: what SLURM kept says why.
    r = _logs(sweep, "plain-lr1e-3-s0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"==> trial.log: {sweep / 'trials' / 'plain-lr1e-3-s0' / 'trial.log'} <==\n"
                               "(no log yet: the trial has not started training)\n\n"
                               f"==> SLURM array task 120_1, stdout: ")
    assert r.stdout.endswith("<==\nstderr of 120_1\nTraceback: the end\n")


@pytest.mark.parametrize("args,message", [
    (lambda s: [s.parent / "nope", TRIAL], "nope: no such sweep folder; pass results/<sweep>"),
    (lambda s: [s / "slurm", TRIAL], "slurm: not a sweep folder (no trials/)"),
    (lambda s: [s, "bn-lr1e-2-s0"], "bn-lr1e-2-s0: no such trial in {s} (its trials: " + TRIAL
     + ", l2-lr1e-3-s0, plain-lr1e-3-s0; `vgg-xai status {s}` lists them)"),
    (lambda s: [s, "../trials"], "../trials: no such trial in"),
    (lambda s: [s, "l2-lr1e-3-s0"], "l2-lr1e-3-s0: no log yet: the trial has not started"),
], ids=["no folder", "not a sweep", "unknown trial", "not a trial id", "not started"])
def test_logs_errors_are_one_line(sweep, args, message):
    r = _logs(*args(sweep))
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("vgg-xai: error: "), r.stderr
    assert message.format(s=sweep) in r.stderr, r.stderr


# ---------------------------------------------------------------------------- data prepare, piped

def test_prepare_says_each_stage_where_stderr_is_a_pipe(sources, tmp_path):
    cache = tmp_path / "c.h5"
    cmd = [sys.executable, "-m", "vgg_xai.cli", "data", "prepare", "--source", str(sources["png"]),
           "--cache", str(cache)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{cache}\n"
    assert r.stderr.splitlines() == [STAGE + x for x in (
        f"reading source {sources['png']} (image folder)", "decoding train: 300 images", "decoding test: 100 images",
        "computing statistics of the train split (240 images)", f"writing cache {cache}", f"done: {cache}")]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.stderr == f"{STAGE}up to date: {cache}\n"

    # On a terminal, the bars say it: no stage lines.
    primary, secondary = pty.openpty()
    p = subprocess.Popen([*cmd, "--force"], stdout=subprocess.PIPE, stderr=secondary, text=True)
    os.close(secondary)
    seen = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(primary)
    assert p.wait(timeout=120) == 0 and p.stdout.read() == f"{cache}\n"
    assert STAGE.encode() not in seen


def _raise_from_trial():
    raise RuntimeError("CUDA out of memory while training")


def test_error_txt_starts_with_the_trial_s_own_exception_in_plain_text():
    """What Ray hands the driver for a failed trial: a RayTaskError made from the trial's real
    traceback, as the instance of the trial's exception class Ray raises (in terminal colours)."""
    import traceback

    from ray.exceptions import RayTaskError

    from vgg_xai.runtime import error_text

    try:
        _raise_from_trial()
    except RuntimeError as e:
        wrapped = RayTaskError("train", traceback.format_exc(), e, proctitle="ray::ImplicitFunc.train", pid=4242,
                               ip="127.0.0.1").as_instanceof_cause()
    raw = f"{type(wrapped).__name__}: {wrapped}"
    assert raw.startswith("RayTaskError(RuntimeError): \x1b[36mray::ImplicitFunc.train()"), raw  # what it was
    text = error_text(wrapped)
    lines = text.splitlines()
    assert lines[0] == "RuntimeError: CUDA out of memory while training"
    assert lines[1] == "" and lines[2] == "Traceback (most recent call last):"
    assert any("in _raise_from_trial" in x for x in lines) and lines[-1] == lines[0]  # the tables quote the last
    assert "\x1b" not in text and "RayTaskError" not in text and "ray::" not in text
    # an exception of this process, with its traceback; one without (a UserError Ray carried): the line alone
    try:
        _raise_from_trial()
    except RuntimeError as e:
        local = error_text(e)
    assert local.splitlines()[0] == lines[0] and "in _raise_from_trial" in local
    assert error_text(UserError("data: no such file")) == "UserError: data: no such file\n"
