"""Checkpoints that verify: a digest beside each one, a damaged latest one falling back to the one
before, and a full disk that leaves the last good checkpoint as it was. Real files and real trials."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from vgg_xai import atomic, checkpoint
from vgg_xai.config import TrialConfig
from vgg_xai.errors import DamagedCheckpoint, DiskFull, UserError
from vgg_xai.train import run_trial

WARNING = "vgg-xai: warning:"


def _cfg(cache: Path, **kw) -> TrialConfig:
    # augmentation on: a resume from the wrong state of its randomness shows in the weights
    base = dict(data=str(cache), width=0.125, epochs=3, batch_size=32, precision="fp32", device="cpu",
                train_size=100, variant="bn_augment")
    base.update(kw)
    return TrialConfig(**base)


class Stop(Exception):
    pass


def _stop_after(epoch: int):
    def report(metrics, _ckpt):
        if metrics["epoch"] == epoch:
            raise Stop

    return report


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size * 2 // 3)


def _flip(path: Path) -> None:
    """Flip a few bytes in the middle, where the tensors are: the archive still parses."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 4):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _epochs(trial_dir: Path) -> list[int]:
    return [int(r["epoch"]) for r in csv.DictReader(open(trial_dir / "history.csv"))]


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(WARNING)]


def _same_weights(a: Path, b: Path) -> bool:
    ma, mb = checkpoint.load(a)["model"], checkpoint.load(b)["model"]
    return ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_cache) -> Path:
    """The trial run from start to end without a break: what every resumed run must equal."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert run_trial(_cfg(tiny_cache), out).status == "completed"
    return out


# ---------------------------------------------------------------------------- the file format

def test_round_trip_with_digest_and_previous_kept(tmp_path):
    path = tmp_path / "checkpoint.pt"
    first = {"model": {"w": torch.randn(64, 32)}, "epoch": 0, "history": [{"epoch": 1, "status": "ok"}]}
    second = {**first, "model": {"w": torch.randn(64, 32)}, "epoch": 1}
    checkpoint.save(first, path, keep_previous=True)
    checkpoint.save(second, path, keep_previous=True)

    back = checkpoint.load(path)
    assert back["epoch"] == 1 and torch.equal(back["model"]["w"], second["model"]["w"])
    assert back["history"] == first["history"]
    prev = checkpoint.load(tmp_path / "checkpoint.prev.pt")
    assert prev["epoch"] == 0 and torch.equal(prev["model"]["w"], first["model"]["w"])
    # the promise of the README: a plain dict that torch.load reads weights_only
    plain = torch.load(path, weights_only=True)
    assert plain["epoch"] == 1 and torch.equal(plain["model"]["w"], second["model"]["w"])
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        digest = (tmp_path / f"{name}.sha256").read_text().strip()
        assert digest == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.prev.pt", "checkpoint.prev.pt.sha256", "checkpoint.pt", "checkpoint.pt.sha256"]


@pytest.mark.parametrize("damage, reason", [(_truncate, "truncated"), (_flip, "digest mismatch"),
                                            (lambda p: p.write_bytes(b""), "truncated: the file is empty")])
def test_damage_is_named(tmp_path, damage, reason):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save({"model": {"w": torch.randn(256, 256)}, "epoch": 3}, path)
    damage(path)
    with pytest.raises(DamagedCheckpoint) as e:
        checkpoint.load(path)
    assert isinstance(e.value, UserError) and e.value.path == path
    assert str(e.value).startswith(f"{path}: damaged checkpoint ({reason}") and "\n" not in str(e.value)


def test_a_checkpoint_without_digest_loads_unverified_and_a_bad_digest_file_is_named(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {"w": torch.ones(3)}, "epoch": 0}, path)  # as written before digests were kept
    assert checkpoint.load(path)["epoch"] == 0
    _truncate(path)
    with pytest.raises(DamagedCheckpoint, match="truncated"):  # torch.load's own failure, named
        checkpoint.load(path)
    checkpoint.save({"model": {"w": torch.ones(3)}, "epoch": 0}, path)
    (tmp_path / "checkpoint.pt.sha256").write_text("not a digest\n")
    with pytest.raises(DamagedCheckpoint, match="digest file checkpoint.pt.sha256 holds no sha256"):
        checkpoint.load(path)
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "missing.pt")


def test_errors_cross_processes_whole(tmp_path):
    # Ray hands a trial's exception to the driver pickled; the driver tells them apart by class.
    for err in (DiskFull(tmp_path, "checkpoint.pt", 1_200_000, 0, 300_000),
                DiskFull(tmp_path, "fig.png", None, 4096, 0, quota=True),
                DamagedCheckpoint(tmp_path / "checkpoint.pt", "truncated: 10 bytes")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and vars(back) == vars(err)
    assert str(DiskFull(tmp_path, "checkpoint.pt", 1_200_000, 0, 300_000)) == (
        f"no space left in {tmp_path}: checkpoint.pt needs 1.2 MB, 300.0 KB free; "
        "free space and run the same command again")


# ---------------------------------------------------------------------------- resuming past damage

@pytest.mark.parametrize("damage, reason", [(_truncate, "truncated"), (_flip, "digest mismatch")],
                         ids=["truncated", "flipped"])
def test_damaged_latest_falls_back_to_previous(tiny_cache, tmp_path, uninterrupted, capsys, damage, reason):
    cfg = _cfg(tiny_cache)
    with pytest.raises(Stop):
        run_trial(cfg, tmp_path, report=_stop_after(2))
    assert checkpoint.load(tmp_path / "checkpoint.prev.pt")["epoch"] == 0
    damage(tmp_path / "checkpoint.pt")
    capsys.readouterr()

    kept = []  # the epoch of the previous checkpoint after each save: never the damaged one
    result = run_trial(cfg, tmp_path, resume=True,
                       report=lambda m, ckpt: kept.append(checkpoint.load(checkpoint.previous_path(ckpt))["epoch"]))
    assert kept == [0, 1]
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert f"{tmp_path / 'checkpoint.pt'} is damaged ({reason}" in lines[0]
    assert lines[0].endswith("resuming from checkpoint.prev.pt at epoch 2 of 3")
    assert result.status == "completed" and result.epochs_completed == 3
    assert _epochs(tmp_path) == [1, 2, 3]
    assert [r["epoch"] for r in checkpoint.load(tmp_path / "checkpoint.pt")["history"]] == [1, 2, 3]
    assert json.loads((tmp_path / "attempts.jsonl").read_text().splitlines()[-1])["start_epoch"] == 1
    assert _same_weights(tmp_path / "checkpoint.pt", uninterrupted / "checkpoint.pt")


def test_history_matches_the_checkpoint_it_falls_back_to(tiny_cache, tmp_path, capsys):
    with pytest.raises(Stop):
        run_trial(_cfg(tiny_cache), tmp_path, report=_stop_after(2))
    assert _epochs(tmp_path) == [1, 2]
    _truncate(tmp_path / "checkpoint.pt")
    # The resumed run dies before its first epoch: attempts.jsonl, written right after the
    # resume, cannot be opened.
    (tmp_path / "attempts.jsonl").unlink()
    (tmp_path / "attempts.jsonl").mkdir()
    with pytest.raises(IsADirectoryError):
        run_trial(_cfg(tiny_cache), tmp_path, resume=True)
    assert len(_warnings(capsys.readouterr().err)) == 1
    assert _epochs(tmp_path) == [1]
    assert not (tmp_path / "checkpoint.pt").exists()
    assert checkpoint.load(tmp_path / "checkpoint.prev.pt")["epoch"] == 0


def test_a_fresh_start_drops_an_earlier_runs_checkpoints(tiny_cache, tmp_path):
    cfg = _cfg(tiny_cache, epochs=2)
    run_trial(cfg, tmp_path)
    assert (tmp_path / "checkpoint.prev.pt").is_file()
    with pytest.raises(Stop):
        run_trial(cfg, tmp_path, report=_stop_after(1))  # not resumed: starts over
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 0
    # the earlier run's last checkpoint is no state for this run to fall back to
    assert not (tmp_path / "checkpoint.prev.pt").exists()


def test_both_damaged_start_again(tiny_cache, tmp_path, uninterrupted, capsys):
    cfg = _cfg(tiny_cache)
    with pytest.raises(Stop):
        run_trial(cfg, tmp_path, report=_stop_after(2))
    _flip(tmp_path / "checkpoint.pt")
    _truncate(tmp_path / "checkpoint.prev.pt")
    capsys.readouterr()

    result = run_trial(cfg, tmp_path, resume=True)
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert f"{tmp_path / 'checkpoint.pt'} is damaged (digest mismatch" in lines[0]
    assert f"{tmp_path / 'checkpoint.prev.pt'} is damaged (truncated" in lines[0]
    assert lines[0].endswith("starting again at epoch 1 of 3")
    assert result.status == "completed" and _epochs(tmp_path) == [1, 2, 3]
    assert json.loads((tmp_path / "attempts.jsonl").read_text().splitlines()[-1])["start_epoch"] == 0
    assert _same_weights(tmp_path / "checkpoint.pt", uninterrupted / "checkpoint.pt")


def test_postprocess_names_a_damaged_checkpoint(tiny_cache, tmp_path, uninterrupted):
    from vgg_xai.postprocess import interpret_trial

    trial = tmp_path / "trial"
    shutil.copytree(uninterrupted, trial)
    _flip(trial / "checkpoint_init.pt")
    with pytest.raises(DamagedCheckpoint, match=f"{trial / 'checkpoint_init.pt'}: damaged checkpoint"):
        interpret_trial(trial)


# ---------------------------------------------------------------------------- a full disk

@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of its own, so that the disk really fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()

    try:
        # room for the init, two checkpoints and the one being written
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], check=True,
                       capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(reason=f"cannot mount a tmpfs here: {getattr(e, 'stderr', '') or e}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _fill(folder: Path, leave: int) -> Path:
    """A file that takes all the free space of ``folder``'s disk but ``leave`` bytes."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(folder).free - leave))
    return filler


def test_full_disk_keeps_the_last_checkpoint(tiny_cache, small_disk, uninterrupted):
    trial = small_disk / "bn_dropout-lr1e-3-s0"
    cfg = _cfg(tiny_cache)
    state = {}

    def fill_after_first(metrics, ckpt):
        if metrics["epoch"] == 1:  # another writer takes the disk: half a checkpoint stays free
            state["filler"] = _fill(small_disk, ckpt.stat().st_size // 2)

    with pytest.raises(DiskFull) as e:
        run_trial(cfg, trial, report=fill_after_first)
    msg = str(e.value)
    assert msg.startswith(f"no space left in {trial}: checkpoint.pt needs ") and "\n" not in msg
    assert msg.endswith("free; free space and run the same command again")
    assert e.value.folder == trial and e.value.needed > e.value.free
    assert not [p.name for p in trial.iterdir() if ".tmp" in p.name]
    assert checkpoint.load(trial / "checkpoint.pt")["epoch"] == 0  # intact and verified
    assert (trial / "checkpoint.pt.sha256").is_file()

    state["filler"].unlink()
    result = run_trial(cfg, trial, resume=True)
    assert result.status == "completed" and _epochs(trial) == [1, 2, 3]
    assert _same_weights(trial / "checkpoint.pt", uninterrupted / "checkpoint.pt")


def test_full_disk_in_atomic_writes(small_disk):
    good = small_disk / "result.json"
    atomic.atomic_write_text(good, "{}")
    _fill(small_disk, 8192)
    where = re.escape(str(small_disk))
    with pytest.raises(DiskFull, match=rf"^no space left in {where}: result.json needs 1.0 MB, "):
        atomic.atomic_write_text(good, "x" * 1_000_000)
    with pytest.raises(DiskFull, match=rf"^no space left in {where}: fig.png needs more than "):
        atomic.atomic_write_bytes(small_disk / "fig.png", lambda tmp: tmp.write_bytes(b"x" * 1_000_000))
    assert good.read_text() == "{}"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "result.json"]
