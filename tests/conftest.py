"""Tiny CIFAR-like data sets written in every real source format.

The images are learnable: each class has its own colour, position of a bright square and
noise, so a few epochs of a small model must beat chance clearly.
"""

from __future__ import annotations

import os
import pickle
import secrets
import shutil
import subprocess
import tempfile
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = [f"c{i}" for i in range(10)]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

# Keep every test on loopback: no usage stats, and Ray's start-up cloud-metadata probe goes to
# a closed loopback port. Subprocesses (the CLI, Ray's workers) inherit these.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["http_proxy"] = os.environ["https_proxy"] = "http://127.0.0.1:9"
os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"


# Every process these tests start carries this mark in its environment: children inherit it, and
# so do Ray's daemons and workers and the SLURM jobs submitted from here. The tests look only at
# processes with the mark, so that another user's Ray or SLURM on the same machine is neither
# counted nor touched.
RUN_MARK = f"{os.getpid()}-{secrets.token_hex(6)}"
os.environ["VGG_XAI_TEST_RUN"] = RUN_MARK


def processes(*needles: str) -> list[str]:
    """Command lines of the processes these tests started that contain any of ``needles``."""
    mark = f"VGG_XAI_TEST_RUN={RUN_MARK}".encode()
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if any(k in cmd for k in needles) and mark in (p / "environ").read_bytes().split(b"\0"):
                    out.append(cmd)
            except OSError:
                continue
    return out


def ray_processes() -> list[str]:
    """Command lines of the Ray daemons and workers these tests started that are still running."""
    return processes("raylet", "gcs_server", "ray::", "default_worker.py")


def make_images(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NCHW images and labels; class k: a tinted background and a square at a k-th spot."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for k in range(10):
        tint = np.array([(k * 37) % 256, (k * 91) % 256, (k * 53) % 256], dtype=np.float64)
        for _ in range(n_per_class):
            img = rng.normal(0, 30, size=(3, 32, 32)) + tint[:, None, None] * 0.6 + 40
            r, c = (k // 4) * 10 + 2, (k % 4) * 7 + 2
            img[:, r:r + 8, c:c + 6] = 250
            xs.append(np.clip(img, 0, 255).astype(np.uint8))
            ys.append(k)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def write_image_tree(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], suffix: str = ".png") -> Path:
    for split, (x, y) in splits.items():
        for i, (img, label) in enumerate(zip(x, y)):
            d = root / split / CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i:05d}{suffix}", quality=95)
    return root


def write_batches(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """The official cifar-10-batches-py layout: five data batches, a test batch, the meta file."""
    root.mkdir(parents=True, exist_ok=True)
    x, y = splits["train"]
    parts = np.array_split(np.arange(len(y)), 5)
    for i, idx in enumerate(parts, 1):
        with open(root / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": x[idx].reshape(len(idx), -1), b"labels": y[idx].tolist()}, f)
    tx, ty = splits["test"]
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": tx.reshape(len(ty), -1), b"labels": ty.tolist()}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES]}, f)
    return root


def write_tar(tree: Path, out: Path, top: str = "cifar") -> Path:
    with tarfile.open(out, "w:gz" if out.name.endswith(".gz") else "w") as tar:
        tar.add(tree, arcname=top)
    return out


@pytest.fixture(scope="session")
def tiny_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"train": make_images(30, seed=1), "test": make_images(10, seed=2)}


@pytest.fixture(scope="session")
def sources(tmp_path_factory, tiny_arrays) -> dict[str, Path]:
    """The same tiny data set as each real source format."""
    base = tmp_path_factory.mktemp("sources")
    png = write_image_tree(base / "png", tiny_arrays, ".png")
    return {
        "png": png,
        "jpeg": write_image_tree(base / "jpeg", tiny_arrays, ".jpg"),
        "batches": write_batches(base / "cifar-10-batches-py", tiny_arrays),
        "tar_gz": write_tar(png, base / "tiny.tar.gz"),
        "tar": write_tar(png, base / "tiny.tar"),
    }


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, sources) -> Path:
    from vgg_xai.data import prepare

    return prepare(sources["png"], tmp_path_factory.mktemp("cache") / "tiny.h5")


def damaged_copy(cache: Path, out: Path) -> Path:
    """A copy of a data cache with one byte of its test images flipped (a disk or a copy went wrong)."""
    import shutil

    import h5py

    shutil.copy(cache, out)
    with h5py.File(out, "r") as f:  # where the test images' bytes lie in the file
        ds = f["test"]["images"]
        offset = ds.id.get_offset() if ds.chunks is None else ds.id.get_chunk_info(0).byte_offset
    with open(out, "r+b") as f:
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    return out


# A stand-in for ssh that does what ssh and sshd do with rsync's command, without a network: it
# takes [-l USER] [-p PORT] HOST COMMAND..., joins COMMAND with spaces and runs it with `sh -c`
# (sshd hands the joined words to the login shell). Anything but localhost is refused.
FAKE_SSH = """\
import subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args = args[2:] if args[0] in ("-l", "-p") else args[1:]
if not args or args[0] != "localhost":
    sys.exit(f"fake ssh: only localhost, not {args[:1]}")
sys.exit(subprocess.call(["sh", "-c", " ".join(args[1:])]))
"""


# ---------------------------------------------------------------------------- SLURM

REPO = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO / "cluster" / "local-slurm" / "local-slurm"


def _sinfo_ok() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="session")
def slurm():
    """A running SLURM for the tests to submit to: the one SLURM_CONF names (CI starts one), else
    the project's local one, started here in its own run directory and stopped at the end. A SLURM
    the tests did not start is never stopped."""
    if os.environ.get("SLURM_CONF"):
        if not _sinfo_ok():
            pytest.skip(reason=f"SLURM_CONF={os.environ['SLURM_CONF']} names a SLURM that does not answer sinfo")
        yield
        return
    if shutil.which("slurmctld") is None:
        pytest.skip(reason="SLURM is not installed here: run cluster/local-slurm/local-slurm install")
    run_dir = tempfile.mkdtemp(prefix="vgg-xai-test-slurm-", dir="/tmp")  # short: munge's socket path
    env = {**os.environ, "VGG_XAI_SLURM_DIR": run_dir}
    r = subprocess.run([str(LOCAL_SLURM), "start", "--gpus", "2"], capture_output=True, text=True, timeout=300,
                       env=env)
    if r.returncode != 0:
        shutil.rmtree(run_dir, ignore_errors=True)
        pytest.skip(reason=f"the local SLURM could not start: {r.stderr.strip().splitlines()[-1:]}")
    os.environ["SLURM_CONF"] = r.stdout.strip().splitlines()[-1].split("=", 1)[1]
    try:
        yield
    finally:
        subprocess.run([str(LOCAL_SLURM), "stop"], capture_output=True, timeout=120, env=env)
        del os.environ["SLURM_CONF"]
        shutil.rmtree(run_dir, ignore_errors=True)
