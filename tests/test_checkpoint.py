"""Checkpoints that verify: a digest beside each one, and a full disk that leaves the file being
replaced as it was. Real files and real trials."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from vgg_xai import checkpoint
from vgg_xai.config import TrialConfig
from vgg_xai.errors import DamagedCheckpoint, DiskFull, UserError
from vgg_xai.train import run_trial

def _cfg(cache: Path, **kw) -> TrialConfig:
    # augmentation on: a resume from the wrong state of its randomness shows in the weights
    base = dict(data=str(cache), width=0.125, epochs=3, batch_size=32, precision="fp32", device="cpu",
                train_size=100, variant="bn_augment")
    base.update(kw)
    return TrialConfig(**base)


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size * 2 // 3)


def _flip(path: Path) -> None:
    """Flip a few bytes in the middle, where the tensors are: the archive still parses."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 4):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


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
        pytest.skip(f"cannot mount a tmpfs here: {getattr(e, 'stderr', '') or e}")
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


def test_full_disk_in_atomic_writes(small_disk):
    good = small_disk / "result.json"
    checkpoint.atomic_write_text(good, "{}")
    _fill(small_disk, 8192)
    where = re.escape(str(small_disk))
    with pytest.raises(DiskFull, match=rf"^no space left in {where}: result.json needs 1.0 MB, "):
        checkpoint.atomic_write_text(good, "x" * 1_000_000)
    with pytest.raises(DiskFull, match=rf"^no space left in {where}: fig.png needs more than "):
        checkpoint.atomic_write_bytes(small_disk / "fig.png", lambda tmp: tmp.write_bytes(b"x" * 1_000_000))
    assert good.read_text() == "{}"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "result.json"]
