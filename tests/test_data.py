from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import shutil
import struct
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASSES, SHARED_DATA, write_batches, write_image_tree, write_tar
from vgg_xai.data import (STAGE, balanced_subset, load_cache, load_splits, make_augment, prepare,
                          split_train_valid)
from vgg_xai.errors import UserError


def _content(cache) -> str:
    with h5py.File(cache, "r") as f:
        return f.attrs["content_sha256"]


@pytest.mark.parametrize("kind", ["png", "batches", "tar_gz", "tar"])
def test_lossless_sources_give_identical_caches(kind, sources, tiny_cache, tmp_path):
    """PNG folder, official pickled batches and the tar archives decode to the same pixels."""
    cache = prepare(sources[kind], tmp_path / "c.h5")
    assert _content(cache) == _content(tiny_cache)
    prep = load_cache(cache)
    assert prep.classes == CLASSES
    assert {k: len(v[1]) for k, v in prep.splits.items()} == {"train": 240, "valid": 60, "test": 100}


def test_jpeg_tree_is_close_to_the_pixels(sources, tiny_arrays, tmp_path):
    prep = load_cache(prepare(sources["jpeg"], tmp_path / "c.h5"))
    x, y = prep.splits["test"]
    assert np.array_equal(y, tiny_arrays["test"][1])
    orig = tiny_arrays["test"][0].reshape(len(y), -1).astype(np.float32)
    dec = x.reshape(len(y), -1).astype(np.float32)
    dist = ((dec[:, None, :] - orig[None, :, :]) ** 2).mean(-1)
    assert np.array_equal(dist.argmin(1), np.arange(len(y)))  # lossy, but each is its own image
    assert 0 < np.diag(dist).mean()


def test_split_and_stats_are_deterministic_and_right(tiny_cache, tiny_arrays, sources, tmp_path):
    prep = load_cache(tiny_cache)
    tr_idx, va_idx = split_train_valid(300, seed=0)
    assert len(set(tr_idx) | set(va_idx)) == 300 and not set(tr_idx) & set(va_idx)
    x_all, y_all = tiny_arrays["train"]
    assert np.array_equal(prep.splits["train"][0], x_all[tr_idx])
    assert np.array_equal(prep.splits["valid"][1], y_all[va_idx])
    assert np.array_equal(prep.splits["test"][0], tiny_arrays["test"][0])
    x = x_all[tr_idx].astype(np.float64) / 255
    np.testing.assert_allclose(prep.mean, x.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(prep.std, x.std(axis=(0, 2, 3)), rtol=1e-5)
    other = load_cache(prepare(sources["png"], tmp_path / "seed1.h5", split_seed=1))
    assert not np.array_equal(other.splits["valid"][1], prep.splits["valid"][1]) or \
        not np.array_equal(other.splits["valid"][0], prep.splits["valid"][0])


def test_prepare_is_idempotent_and_rebuilds_on_change(tiny_arrays, tmp_path):
    src = write_image_tree(tmp_path / "src", tiny_arrays)
    cache = prepare(src, tmp_path / "c.h5")
    stamp = cache.stat().st_mtime_ns
    assert prepare(src, cache) == cache and cache.stat().st_mtime_ns == stamp  # reused at once
    before = _content(cache)
    img = np.full((32, 32, 3), 7, np.uint8)
    Image.fromarray(img).save(src / "test" / "c3" / "extra.png")
    prepare(src, cache)
    assert _content(cache) != before
    assert load_cache(cache).splits["test"][0].shape[0] == 101
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_cache_from_another_source_is_refused(sources, tiny_cache):
    with pytest.raises(UserError, match="prepared from .*pass another --cache path or --force"):
        prepare(sources["batches"], tiny_cache)


def test_balanced_subset():
    labels = np.repeat(np.arange(10), 50)
    idx = balanced_subset(labels, 95, seed=3)
    counts = np.bincount(labels[idx], minlength=10)
    assert len(idx) == 95 and counts.max() - counts.min() == 1
    assert np.array_equal(idx, balanced_subset(labels, 95, seed=3))
    assert not np.array_equal(idx, balanced_subset(labels, 95, seed=4))
    assert len(balanced_subset(labels, None, 0)) == 500


def test_device_batches_cover_the_split_and_are_normalized(tiny_cache):
    splits, prep = load_splits(tiny_cache, torch.device("cpu"))
    train = splits["train"]
    g = torch.Generator().manual_seed(0)
    ys = torch.cat([y for _, y in train.batches(64, generator=g)])
    assert sorted(ys.tolist()) == sorted(train.labels.tolist())
    assert not torch.equal(ys, train.labels)  # shuffled
    x = torch.cat([x for x, _ in train.batches(64)])
    assert x.dtype == torch.float32 and x.shape == (240, 3, 32, 32)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2)
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    assert torch.equal(next(train.batches(32, generator=g1))[1], next(train.batches(32, generator=g2))[1])


def test_augmentation_is_per_sample_and_keeps_shape(tiny_cache):
    splits, _ = load_splits(tiny_cache, torch.device("cpu"))
    one = splits["train"].images[:1].float() / 255
    batch = one.repeat(64, 1, 1, 1)
    torch.manual_seed(0)
    out = make_augment()(batch)
    assert out.shape == batch.shape and torch.isfinite(out).all()
    assert torch.equal(batch, one.repeat(64, 1, 1, 1))  # input not mutated
    distinct = {tuple(o.flatten()[:64].tolist()) for o in out}
    assert len(distinct) > 32  # the same image, augmented differently per sample


# ---------------------------------------------------------------------------- bad input

def _cli(*args: str):
    return subprocess.run([sys.executable, "-m", "vgg_xai.cli", *args], capture_output=True, text=True)


def _not_stages(stderr: str) -> str:
    """stderr without the lines that say how far preparation got (printed where stderr is a pipe)."""
    return "".join(x for x in stderr.splitlines(keepends=True) if not x.startswith(STAGE))


def _bad_tree(tmp_path, tiny_arrays, mutate):
    root = write_image_tree(tmp_path / "tree", {k: (v[0][::10], v[1][::10]) for k, v in tiny_arrays.items()})
    mutate(root)
    return root


def _small_image(root):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "train" / "c1" / "small.png")


def _grey_image(root):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "test" / "c2" / "grey.png")


def _class_differs(root):
    shutil.move(root / "test" / "c4", root / "test" / "c44")


def _empty_class(root):
    for p in (root / "train" / "c5").iterdir():
        p.unlink()


def _not_images(root):
    shutil.rmtree(root / "test")


@pytest.mark.parametrize("mutate,message", [
    (_small_image, "small.png: image is 16x16 RGB, expected 32x32 RGB"),
    (_grey_image, "grey.png: image is 32x32 L, expected 32x32 RGB"),
    (_class_differs, "train and test class folders differ"),
    (_empty_class, "class folder train/c5 has no images"),
    (_not_images, "not an image tree"),
])
def test_bad_trees_give_one_line_errors(mutate, message, tiny_arrays, tmp_path):
    root = _bad_tree(tmp_path, tiny_arrays, mutate)
    for src in (root, write_tar(root, tmp_path / "bad.tar.gz")):
        r = _cli("data", "prepare", "--source", str(src), "--cache", str(tmp_path / "c.h5"))
        assert r.returncode == 2
        assert message in r.stderr and str(src) in r.stderr
        assert len(_not_stages(r.stderr).strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert not (tmp_path / "c.h5").exists()


def test_missing_path_and_truncated_archive(sources, tmp_path):
    r = _cli("data", "prepare", "--source", str(tmp_path / "nope"), "--cache", str(tmp_path / "c.h5"))
    assert r.returncode == 2 and "nope: no such file or folder" in r.stderr
    data = sources["tar_gz"].read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    r = _cli("data", "prepare", "--source", str(cut), "--cache", str(tmp_path / "c.h5"))
    assert r.returncode == 2 and "cut.tar.gz: archive is truncated or corrupt" in r.stderr
    assert len(_not_stages(r.stderr).strip().splitlines()) == 1
    assert not (tmp_path / "c.h5").exists()


def test_cli_refuses_cache_of_another_source_and_keeps_it(sources, tmp_path):
    cache = prepare(sources["png"], tmp_path / "c.h5")
    before = cache.read_bytes()
    r = _cli("data", "prepare", "--source", str(sources["batches"]), "--cache", str(cache))
    assert r.returncode == 2 and "was prepared from" in r.stderr
    assert cache.read_bytes() == before


def test_cli_train_without_cache_says_how_to_prepare(tmp_path):
    r = _cli("train", "--cache", str(tmp_path / "none.h5"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "vgg-xai data prepare" in r.stderr


# ---------------------------------------------------------------------------- pickled batches: data, never code

class _Payload:
    """What a crafted batch file holds: an object whose unpickling calls ``call(*args)``."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _crafted(call: str, canary) -> _Payload:
    return {"os.system": _Payload(os.system, f"touch {canary}"),
            "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(canary)]),
            "builtins.eval": _Payload(eval, f"open({str(canary)!r}, 'w')")}[call]


def _official_pickle(obj) -> bytes:
    """obj pickled as the official files were, by Python 2's cPickle with numpy 1: bytes as Python 2
    strings and numpy's core module named numpy.core (protocol 2, without the _codecs calls Python 3
    makes for bytes there)."""

    class Py2Pickler(pickle._Pickler):
        def save_bytes(self, b: bytes) -> None:
            self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b if len(b) < 256
                       else pickle.BINSTRING + struct.pack("<i", len(b)) + b)
            self.memoize(b)

        dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}

    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


@pytest.mark.parametrize("call", ["os.system", "subprocess.Popen", "builtins.eval"])
def test_a_batch_file_that_runs_code_is_refused(call, tiny_arrays, tmp_path):
    """A crafted data_batch_3 in the official layout: one-line error naming the file and the global,
    nothing run, no cache written."""
    root = write_batches(tmp_path / "cifar-10-batches-py", tiny_arrays)
    canary, cache = tmp_path / "CANARY", tmp_path / "cache" / "c.h5"
    with open(root / "data_batch_3", "rb") as f:
        batch = pickle.load(f)
    batch[b"labels"] = _crafted(call, canary)
    (root / "data_batch_3").write_bytes(pickle.dumps(batch))
    with pytest.raises(UserError) as e:
        prepare(root, cache)
    msg = str(e.value)
    assert msg.startswith(f"{root / 'data_batch_3'}: refused to load ") and len(msg.splitlines()) == 1
    assert ("posix.system" if call == "os.system" else call) in msg
    assert not canary.exists()
    assert not cache.exists() and not (cache.parent.exists() and list(cache.parent.iterdir()))


def test_cli_refuses_a_batch_file_that_runs_code(tiny_arrays, tmp_path):
    root = write_batches(tmp_path / "cifar-10-batches-py", tiny_arrays)
    canary = tmp_path / "CANARY"
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": _crafted("os.system", canary)}))
    r = _cli("data", "prepare", "--source", str(root), "--cache", str(tmp_path / "c.h5"))
    err = _not_stages(r.stderr)
    assert r.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"vgg-xai: error: {root / 'batches.meta'}: refused to load posix.system")
    assert not canary.exists() and not (tmp_path / "c.h5").exists()


@pytest.mark.parametrize("dumps", [pickle.dumps, _official_pickle], ids=["numpy2", "official"])
def test_batches_with_numpy_arrays_still_prepare(dumps, tiny_arrays, tiny_cache, tmp_path):
    """Arrays are data: labels as a numpy array, as this numpy pickles it and as the official files
    spell it (numpy.core.multiarray._reconstruct), give the same cache as the image folder."""
    root = write_batches(tmp_path / "cifar-10-batches-py", tiny_arrays)
    for name in ("data_batch_2", "test_batch"):
        with open(root / name, "rb") as f:
            batch = pickle.load(f)
        (root / name).write_bytes(dumps({**batch, b"labels": np.asarray(batch[b"labels"], dtype=np.int64)}))
    globals_ = {a for op, a, _ in pickletools.genops((root / "test_batch").read_bytes())
                if op.name in ("GLOBAL", "SHORT_BINUNICODE")}
    assert ("numpy.core.multiarray _reconstruct" in globals_) == (dumps is _official_pickle)
    assert _content(prepare(root, tmp_path / "c.h5")) == _content(tiny_cache)


# ---------------------------------------------------------------------------- the real data

@pytest.mark.slow  # decodes all 60,000 images of the archive
@pytest.mark.skipif(not SHARED_DATA.is_file(), reason=f"real CIFAR-10 copy not found at {SHARED_DATA}")
def test_real_cifar10(tmp_path):
    cache = prepare(SHARED_DATA, tmp_path / "cifar10.h5")
    prep = load_cache(cache)
    assert prep.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                            "ship", "truck"]
    sizes = {k: len(v[1]) for k, v in prep.splits.items()}
    assert sizes == {"train": 40000, "valid": 10000, "test": 10000}
    assert sum(sizes.values()) == 60000
    np.testing.assert_allclose(prep.mean, [0.4914, 0.4822, 0.4465], atol=0.01)
    assert all(np.bincount(prep.splits["test"][1]) == 1000)
    with h5py.File(cache, "r") as f:
        assert json.loads(f.attrs["classes"]) == prep.classes
        assert f.attrs["source"] == str(SHARED_DATA)
