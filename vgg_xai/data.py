"""CIFAR-10: any source -> one prepared uint8 cache (HDF5) -> batches on the training device.

Sources: torchvision's download (None), an extracted ``cifar-10-batches-py`` folder, or an
ImageFolder tree (``train/<class>/*``, ``test/<class>/*``) as a folder, .tar or .tar.gz.

The cache holds uint8 NCHW images and int64 labels per split (train / valid / test), the class
names, the train split's per-channel mean/std and provenance. Training never touches PIL or a
DataLoader: the split lives on the device and batches are slices of it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch

from .config import DEFAULT_CACHE
from .errors import UserError
from .progress import progress, stage

CACHE_FORMAT = 1
VALID_FRACTION = 0.2  # 10,000 of the official 50,000 training images
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm")
N_CLASSES = 10
KIND_NAMES = {"batches": "pickled batches", "folder": "image folder", "tar": "image archive"}
STAGE = "vgg-xai data prepare: "  # the lines that say how far preparation got, in a log or a pipe


def _stage(text: str) -> None:
    stage(STAGE + text)


# ---------------------------------------------------------------------------- sources

@dataclass
class RawSplits:
    """Decoded images of a source: uint8 NCHW arrays and int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]


def source_kind(source: Path) -> str:
    if not source.exists():
        raise UserError(f"{source}: no such file or folder; pass --source an extracted "
                        "cifar-10-batches-py folder or an ImageFolder tree (.tar, .tar.gz or folder)")
    if source.is_dir():
        if (source / "data_batch_1").is_file() and (source / "test_batch").is_file():
            return "batches"
        if (source / "cifar-10-batches-py" / "data_batch_1").is_file():
            return "batches"
        return "folder"
    if source.name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    raise UserError(f"{source}: not a folder, .tar or .tar.gz; pass an extracted "
                    "cifar-10-batches-py folder or an ImageFolder tree")


def fingerprint(source: Path) -> str:
    """A cheap identity of a source's current contents: names, sizes and mtimes."""
    h = hashlib.sha256()
    paths = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(source) if p != source else p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# The only globals the official batch files name: the pieces of a numpy array (numpy 2 spells
# the module numpy._core). Loading a pickle calls whatever globals it names, so a batch file from
# anywhere else could run any code; these only rebuild arrays.
_BATCH_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype")}


class _BatchUnpickler(pickle.Unpickler):
    """Reads a cifar-10-batches-py file: dicts, lists, bytes, numbers and numpy arrays, nothing else."""

    def __init__(self, f, path: Path):
        super().__init__(f, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _BATCH_GLOBALS:
            raise UserError(f"{self.path}: refused to load {module}.{name}: a CIFAR-10 batch file holds only "
                            "arrays, lists and bytes, and this one names code to run; use the official "
                            "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html")
        return super().find_class(module, name)


def _read_batches(source: Path) -> RawSplits:
    root = source if (source / "data_batch_1").is_file() else source / "cifar-10-batches-py"

    def load(name: str) -> dict:
        path = root / name
        if not path.is_file():
            raise UserError(f"{path}: missing; a cifar-10-batches-py folder has data_batch_1..5, "
                            "test_batch and batches.meta")
        try:
            with open(path, "rb") as f:
                return _BatchUnpickler(f, path).load()
        except UserError:
            raise
        except Exception as e:  # a corrupt pickle raises many kinds of error
            raise UserError(f"{path}: not a CIFAR-10 batch file ({type(e).__name__}: {e})") from None

    def arrays(d: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(d[b"data"], dtype=np.uint8)
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise UserError(f"{root / name}: images are not 32x32 RGB (rows of {x.shape[1:]} values)")
        return x.reshape(-1, 3, 32, 32), np.asarray(d[b"labels"], dtype=np.int64)

    train = [arrays(load(f"data_batch_{i}"), f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = arrays(load("test_batch"), "test_batch")
    meta = load("batches.meta")
    classes = [c.decode() for c in meta[b"label_names"]]
    return RawSplits(np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
                     test_x, test_y, classes)


def _decode(data: bytes, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # only at preparation, never in training

    try:
        with Image.open(io.BytesIO(data)) as im:
            mode, size = im.mode, im.size
            if size != (32, 32) or mode != "RGB":
                raise UserError(f"{where}: image is {size[0]}x{size[1]} {mode}, expected 32x32 RGB")
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{where}: not a readable image ({e})") from None


def _image_tree(entries: dict[str, list[str]], source: Path) -> tuple[str, dict[str, dict[str, list[str]]]]:
    """Find the train/ and test/ class folders in a listing {dir: [files]}.

    Returns the prefix above train/ and {split: {class: [file paths]}}.
    """
    tree: dict[str, dict[str, dict[str, list[str]]]] = {}
    for d, files in entries.items():
        parts = d.split("/")
        if len(parts) >= 2 and parts[-2] in ("train", "test"):
            prefix = "/".join(parts[:-2])
            images = sorted(f for f in files if f.lower().endswith(IMAGE_SUFFIXES))
            tree.setdefault(prefix, {}).setdefault(parts[-2], {})[parts[-1]] = images
    roots = [p for p, splits in tree.items() if set(splits) == {"train", "test"}]
    if len(roots) != 1:
        raise UserError(f"{source}: not an image tree; expected train/<class>/* and test/<class>/* "
                        "(an ImageFolder layout) or a cifar-10-batches-py folder")
    prefix = roots[0]
    splits = tree[prefix]
    if sorted(splits["train"]) != sorted(splits["test"]):
        raise UserError(f"{source}: train and test class folders differ "
                        f"(train: {', '.join(sorted(splits['train']))}; test: {', '.join(sorted(splits['test']))})")
    if len(splits["train"]) != N_CLASSES:
        raise UserError(f"{source}: {len(splits['train'])} class folders under train/ and test/ "
                        f"({', '.join(sorted(splits['train']))}); CIFAR-10 has {N_CLASSES}")
    for split, classes in splits.items():
        for c, files in classes.items():
            if not files:
                raise UserError(f"{source}: class folder {split}/{c} has no images")
    return prefix, splits


def _read_folder(source: Path) -> RawSplits:
    entries = {Path(d).relative_to(source).as_posix(): files for d, _, files in os.walk(source)}
    prefix, splits = _image_tree(entries, source)
    root = source / prefix if prefix not in ("", ".") else source
    return _decode_splits(splits, lambda rel: (root / rel).read_bytes(), lambda rel: str(root / rel))


def _decode_splits(splits: dict[str, dict[str, list[str]]], read, where) -> RawSplits:
    """Decode {split: {class: [files]}} with read(relpath) -> bytes; labels by sorted class."""
    classes = sorted(splits["train"])
    out = []
    for split in ("train", "test"):
        xs, ys = [], []
        _stage(f"decoding {split}: {sum(len(v) for v in splits[split].values())} images")
        with progress(total=sum(len(v) for v in splits[split].values()), desc=f"decode {split}") as bar:
            for label, c in enumerate(classes):
                for f in splits[split][c]:
                    rel = f"{split}/{c}/{f}"
                    xs.append(_decode(read(rel), where(rel)))
                    ys.append(label)
                    bar.update()
        out.append((np.stack(xs), np.asarray(ys, dtype=np.int64)))
    return RawSplits(out[0][0], out[0][1], out[1][0], out[1][1], classes)


def _read_tar(source: Path) -> RawSplits:
    try:
        with tarfile.open(source, "r:*") as tar:
            members = {}
            entries: dict[str, list[str]] = {}
            for m in tar:  # streams; a truncated archive fails here or while reading
                name = m.name.lstrip("./")
                if m.isdir():  # an empty class folder is a member too
                    entries.setdefault(name.rstrip("/"), [])
                elif m.isfile():
                    d, _, f = name.rpartition("/")
                    entries.setdefault(d, []).append(f)
                    members[name] = m
            prefix, splits = _image_tree(entries, source)

            def read(rel: str) -> bytes:
                fobj = tar.extractfile(members["/".join(p for p in (prefix, rel) if p)])
                assert fobj is not None
                return fobj.read()

            return _decode_splits(splits, read, lambda rel: f"{source}:{rel}")
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
        raise UserError(f"{source}: archive is truncated or corrupt ({type(e).__name__}: {e}); "
                        "download or copy it again") from None


def _download(root: Path) -> Path:
    import torchvision

    try:
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    except Exception as e:
        raise UserError(f"CIFAR-10 download failed ({type(e).__name__}: {e}); offline, pass --source "
                        "a local copy (cifar-10-batches-py folder or ImageFolder .tar.gz)") from None
    return root / "cifar-10-batches-py"


def read_source(source: Path) -> RawSplits:
    kind = source_kind(source)
    raw = {"batches": _read_batches, "folder": _read_folder, "tar": _read_tar}[kind](source)
    if len(raw.classes) != N_CLASSES:  # a model with 10 outputs would fail on an 11th class mid-training
        raise UserError(f"{source}: {len(raw.classes)} classes ({', '.join(raw.classes[:12])}); "
                        f"CIFAR-10 has {N_CLASSES}")
    for name, y in (("train", raw.train_y), ("test", raw.test_y)):
        if len(y) and not (0 <= y.min() and y.max() < N_CLASSES):
            raise UserError(f"{source}: {name} labels outside 0..{N_CLASSES - 1}; not a CIFAR-10 source")
    return raw


# ---------------------------------------------------------------------------- the cache

def split_train_valid(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the official training set kept for train and drawn for valid."""
    perm = np.random.default_rng(seed).permutation(n)
    n_valid = int(round(n * VALID_FRACTION))
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # float64 sums over uint8 in chunks: exact enough and no 600 MB float copy.
    c = x.shape[1]
    s = np.zeros(c)
    s2 = np.zeros(c)
    for i in range(0, len(x), 8192):
        chunk = x[i:i + 8192].astype(np.float64) / 255.0
        s += chunk.sum(axis=(0, 2, 3))
        s2 += (chunk ** 2).sum(axis=(0, 2, 3))
    m = len(x) * x.shape[2] * x.shape[3]
    mean = s / m
    return mean.astype(np.float32), np.sqrt(s2 / m - mean ** 2).astype(np.float32)


def prepare(source: str | Path | None, cache: str | Path = DEFAULT_CACHE, *, split_seed: int = 0,
            force: bool = False) -> Path:
    """Turn a source into the cache file and return its path.

    Idempotent: a cache made from the same source (same contents) is returned at once; a source
    whose contents changed is prepared again; a cache made from another source is an error
    unless ``force``. The cache is written to a temporary file and renamed, so a half-written
    one is never used.
    """
    cache = Path(cache).absolute()
    check_cache_path(cache)
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise UserError(f"--split-seed: expected a whole number >= 0, got {split_seed!r}")
    if source is None:
        _stage(f"downloading CIFAR-10 with torchvision into {cache.parent / 'download'}")
        src = _download(cache.parent / "download")
    else:
        src = Path(source).resolve()
    source_kind(src)
    fp = fingerprint(src)
    if cache.exists() and not force:
        try:
            with h5py.File(cache, "r") as f:
                old_src, old_fp = f.attrs.get("source", ""), f.attrs.get("source_fingerprint", "")
                old_seed = int(f.attrs.get("split_seed", -1))
        except OSError:
            old_src, old_fp, old_seed = "", "", -1  # unreadable: rebuild it
        if old_src and old_src != str(src):
            raise UserError(f"{cache}: this cache was prepared from {old_src}, not {src}; "
                            "pass another --cache path or --force to replace it")
        if old_fp == fp and old_seed == split_seed:
            _stage(f"up to date: {cache}")
            return cache
    _stage(f"reading source {src} ({KIND_NAMES[source_kind(src)]})")
    raw = read_source(src)
    tr_idx, va_idx = split_train_valid(len(raw.train_x), split_seed)
    splits = {
        "train": (raw.train_x[tr_idx], raw.train_y[tr_idx]),
        "valid": (raw.train_x[va_idx], raw.train_y[va_idx]),
        "test": (raw.test_x, raw.test_y),
    }
    _stage(f"computing statistics of the train split ({len(tr_idx)} images)")
    mean, std = _channel_stats(splits["train"][0])
    _stage(f"writing cache {cache}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            for name, (x, y) in splits.items():
                g = f.create_group(name)
                g.create_dataset("images", data=x, chunks=True)
                g.create_dataset("labels", data=y)
            f.attrs.update({
                "format": CACHE_FORMAT, "classes": json.dumps(raw.classes), "mean": mean, "std": std,
                "source": str(src), "source_fingerprint": fp, "content_sha256": content_digest(splits),
                "split_seed": split_seed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)
    _stage(f"done: {cache}")
    return cache


@dataclass
class Prepared:
    """The cache read into memory: {split: (images uint8 NCHW, labels int64)}."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    classes: list[str]
    mean: np.ndarray
    std: np.ndarray
    attrs: dict


def check_cache_path(cache: Path) -> None:
    """A cache path that can be written: not a folder, in a folder this user may write to."""
    if cache.is_dir():
        raise UserError(f"--cache {cache}: is a folder; name the cache file, e.g. {cache / 'cifar10.h5'}")
    folder = next((p for p in (cache.parent, *cache.parent.parents) if p.exists()), None)
    if folder is None or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--cache {cache}: {folder} is not a folder this user may write to; choose another --cache")


def check_subsets(asked: dict[str, int | None], sizes: dict[str, int], cache: str | Path) -> None:
    """A subset asks for at most what its split of the cache holds (else it would silently be all of it)."""
    for split, n in asked.items():
        if n is not None and n > sizes[split]:
            raise UserError(f"{split}_size: {n}, but the {split} split of {cache} has {sizes[split]} images; "
                            "lower it or leave it out (null: all of them)")


def split_sizes(cache: str | Path) -> dict[str, int]:
    """Images per split of a prepared cache, from its datasets' shapes (nothing is read)."""
    try:
        with h5py.File(cache, "r") as f:
            return {s: int(f[s]["labels"].shape[0]) for s in ("train", "valid", "test")}
    except (OSError, KeyError) as e:
        raise UserError(f"{cache}: not a readable vgg-xai data cache ({e}); prepare it again") from None


def content_digest(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """What identifies a data set: sha256 over the images and labels of train, valid and test."""
    h = hashlib.sha256()
    for name in ("train", "valid", "test"):
        for a in splits[name]:
            h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def verify_cache(cache: str | Path) -> str:
    """The cache's content digest, after checking its bytes against it (about 0.3 s for CIFAR-10), and
    that it holds the 10 classes the model has outputs for.

    A sweep opens its cache with this before anything runs: a damaged cache is refused here, in
    one line, instead of in every trial after Ray has started.
    """
    prep = load_cache(cache)
    stored = prep.attrs.get("content_sha256", "")
    actual = content_digest(prep.splits)
    if stored != actual:
        raise UserError(f"{cache}: the data cache is damaged (its images or labels do not match the digest stored "
                        "when it was prepared); prepare it again with `vgg-xai data prepare --force`")
    labels = np.unique(np.concatenate([y for _, y in prep.splits.values()]))
    if len(prep.classes) != N_CLASSES or labels.min() < 0 or labels.max() >= N_CLASSES:
        raise UserError(f"{cache}: holds {len(prep.classes)} classes (labels {labels.min()} to {labels.max()}), where "
                        f"the model has {N_CLASSES} outputs, one per CIFAR-10 class; prepare it from a source with "
                        f"{N_CLASSES} classes")
    return actual


def cached_identity(source: str | Path | None, cache: str | Path) -> str | None:
    """The content digest ``prepare(source, cache)`` would give, read from the cache's attributes
    without decoding or preparing anything; None where it is not known before preparing."""
    cache = Path(cache)
    if not cache.is_file():
        return None
    try:
        with h5py.File(cache, "r") as f:
            attrs = dict(f.attrs)
    except OSError:
        return None
    if source is not None:
        src = Path(source).resolve()
        if str(attrs.get("source", "")) != str(src) or attrs.get("source_fingerprint") != fingerprint(src):
            return None
    digest = attrs.get("content_sha256")
    return str(digest) if digest else None


def load_cache(cache: str | Path) -> Prepared:
    cache = Path(cache)
    if not cache.is_file():
        raise UserError(f"{cache}: no prepared data; run `vgg-xai data prepare --source PATH --cache {cache}`")
    try:
        with h5py.File(cache, "r") as f:
            if int(f.attrs.get("format", -1)) != CACHE_FORMAT:
                raise UserError(f"{cache}: not a vgg-xai data cache of format {CACHE_FORMAT}; prepare it again")
            splits = {s: (f[s]["images"][()], f[s]["labels"][()]) for s in ("train", "valid", "test")}
            attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}
            return Prepared(splits, json.loads(f.attrs["classes"]), np.asarray(f.attrs["mean"]),
                            np.asarray(f.attrs["std"]), attrs)
    except OSError as e:
        raise UserError(f"{cache}: not a readable HDF5 data cache ({e}); prepare it again") from None


def balanced_subset(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced, deterministic subset (all indices when size is None)."""
    if size is None or size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = np.full(len(classes), size // len(classes))
    per[: size % len(classes)] += 1
    picked = []
    for c, k in zip(classes, per):
        idx = np.flatnonzero(labels == c)
        picked.append(rng.permutation(idx)[: min(k, len(idx))])
    return np.sort(np.concatenate(picked))


# ---------------------------------------------------------------------------- on the device

def make_augment() -> torch.nn.Module:
    """Per-sample augmentation of a float [0, 1] NCHW batch, batched on its device (kornia).

    Vertical flip; one affine warp for rotation, translation, scale and shear (a rotation and
    an affine in one resampling: half the work and one interpolation blur, not two); random
    crop after zero padding; colour jitter.
    """
    import kornia.augmentation as K

    return K.AugmentationSequential(
        K.RandomVerticalFlip(p=0.5),
        K.RandomAffine(degrees=15.0, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10.0, p=0.5),
        K.RandomCrop((32, 32), padding=4, p=1.0),
        K.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=0.5),
    )


class DeviceSplit:
    """One split resident on the device as uint8; yields normalized float batches.

    uint8 on the device is 4x smaller than float32 and the conversion is one fused op per batch.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: np.ndarray, std: np.ndarray,
                 device: torch.device):
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.labels = torch.from_numpy(np.ascontiguousarray(labels)).to(device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.device = device

    def __len__(self) -> int:
        return len(self.labels)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - self.mean) / self.std

    def batches(self, batch_size: int, *, generator: torch.Generator | None = None,
                augment: torch.nn.Module | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalized (x, y) batches; shuffled when a generator is given, else in order."""
        n = len(self)
        order = torch.randperm(n, generator=generator).to(self.device) if generator is not None else None
        for i in range(0, n, batch_size):
            if order is None:
                xb, yb = self.images[i:i + batch_size], self.labels[i:i + batch_size]
            else:
                idx = order[i:i + batch_size]
                xb, yb = self.images[idx], self.labels[idx]
            x = xb.float().div_(255.0)
            if augment is not None:
                x = augment(x)
            yield self.normalize(x), yb


def load_splits(cfg_data: str | Path, device: torch.device, *, train_size: int | None = None,
                valid_size: int | None = None, test_size: int | None = None,
                subset_seed: int = 0) -> tuple[dict[str, DeviceSplit], Prepared]:
    """The three splits of a cache on the device, subset as asked."""
    prep = load_cache(cfg_data)
    sizes = {"train": train_size, "valid": valid_size, "test": test_size}
    check_subsets(sizes, {name: len(y) for name, (_, y) in prep.splits.items()}, cfg_data)
    out = {}
    for name, (x, y) in prep.splits.items():
        idx = balanced_subset(y, sizes[name], subset_seed)
        out[name] = DeviceSplit(x[idx], y[idx], prep.mean, prep.std, device)
    return out, prep
