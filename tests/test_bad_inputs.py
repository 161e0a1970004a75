"""Bad input, as careless and hostile users give it: one line that names the key or the file, a
non-zero exit, no traceback, and nothing written, for every class of mistake.

The commands run in this process (`vgg_xai.cli.main`), as the console script runs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml

from conftest import damaged_copy, make_images, write_image_tree
from vgg_xai.cli import main
from vgg_xai.data import STAGE

# A spec that runs; each case below breaks one thing of it.
GOOD = {"name": "t", "model": {"width": 0.125}, "grid": {"variant": ["bn"], "lr_schedule": ["const_1e-3"]},
        "training": {"epochs": 1, "batch_size": 32, "precision": "fp32"}, "resources": {"cpu": 1}, "retries": 0}


def _spec(tmp: Path, cache: Path, change: Callable[[dict], None] | None = None, raw: bytes | None = None) -> Path:
    d = yaml.safe_load(yaml.safe_dump(GOOD))
    d["data"], d["results"] = {"source": str(cache)}, str(tmp / "results")
    if change:
        change(d)
    path = tmp / "spec.yaml"
    path.write_bytes(raw if raw is not None else yaml.safe_dump(d).encode())
    return path


def _set(section: str, key: str, value) -> Callable[[dict], None]:
    return lambda d: d.setdefault(section, {}).__setitem__(key, value) if section else d.__setitem__(key, value)


SPEC_CASES = {  # id: (change, the text the one line must hold)
    "not utf-8": (b"name: t\ndata: {source: \xff\xfe}\n", "not UTF-8 text"),
    "grid value a mapping": (_set("grid", "variant", {"bn": 1}), "variant: expected a value or a list of values"),
    "variants a string": (_set("", "variants", "bn"), "variants: expected a mapping"),
    "variants a list": (_set("", "variants", ["bn", "plain"]), "variants: expected a mapping"),
    "data a string": (_set("", "data", "cifar.tar.gz"), "data: expected a mapping"),
    "data.source a number": (_set("data", "source", 5), "data.source: expected a path"),
    "NUL in the name": (_set("", "name", "a\0b"), "name: 'a\\x00b' is not a valid name"),
    "300 characters in the name": (_set("", "name", "n" * 300), "(300 characters) is not a valid name"),
    "split_seed not a number": (_set("data", "split_seed", "abc"), "data.split_seed: expected a whole number"),
    "negative split_seed": (_set("data", "split_seed", -1), "data.split_seed: expected a whole number >= 0"),
    "batch larger than the train subset": (lambda d: (d["training"].update(batch_size=500),
                                                      d["data"].update(train_size=100)), "batch_size: 500 is more"),
    "train_size not a multiple of 10": (_set("data", "train_size", 105), "train_size: a class-balanced subset"),
    "train_size beyond CIFAR-10's split": (_set("data", "train_size", 50000), "train_size: must be in [10, 40000]"),
    "train_size beyond the cache's split": (_set("data", "train_size", 1000), "train_size: 1000, but the train split"),
    "width without a channel": (_set("model", "width", 0.001), "width: must be in [0.015625, 64]"),
    "width inf": (_set("model", "width", float("inf")), "width: must be a finite number"),
    "l2_coef nan": (_set("training", "l2_coef", float("nan")), "l2_coef: must be a finite number"),
    "negative seed": (_set("grid", "seed", [-1]), "seed: must be in [0,"),
    "negative subset_seed": (_set("data", "subset_seed", -3), "subset_seed: must be in [0,"),
    "results a number": (_set("", "results", 7), "results: expected a folder path"),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_a_bad_spec_is_one_line_and_writes_nothing(case, tmp_path, tiny_cache, capsys):
    change, message = SPEC_CASES[case]
    spec = _spec(tmp_path, tiny_cache, raw=change) if isinstance(change, bytes) else _spec(tmp_path, tiny_cache,
                                                                                            change)
    _assert_one_line(capsys, main(["sweep", str(spec)]), message)
    assert not (tmp_path / "results").exists()


def test_a_data_file_that_is_not_a_cache_is_one_line(tmp_path, capsys):
    fake = tmp_path / "cifar.h5"
    fake.write_bytes(b"not HDF5 at all" * 100)
    _assert_one_line(capsys, main(["sweep", str(_spec(tmp_path, fake))]), f"{fake}: not a readable vgg-xai data cache")
    assert not (tmp_path / "results").exists()


def test_results_that_is_a_file_is_one_line(tmp_path, tiny_cache, capsys):
    (tmp_path / "afile").write_text("mine")
    _assert_one_line(capsys, main(["sweep", str(_spec(tmp_path, tiny_cache)), "--results", str(tmp_path / "afile")]),
                     "is a file; name a folder for the sweep's results")
    assert (tmp_path / "afile").read_text() == "mine"


def _tree(root: Path, n_classes: int) -> Path:
    x, y = make_images(2, seed=3)
    keep = y < n_classes if n_classes <= 10 else np.ones(len(y), bool)
    tree = write_image_tree(root, {"train": (x[keep], y[keep]), "test": (x[keep], y[keep])})
    if n_classes > 10:  # an 11th class folder
        for split in ("train", "test"):
            extra = tree / split / "c10"
            extra.mkdir()
            (extra / "0.png").write_bytes(next((tree / split / "c0").iterdir()).read_bytes())
    return tree


@pytest.mark.parametrize("n", [2, 9, 11])
def test_a_tree_without_ten_classes_is_refused(n, tmp_path, capsys):
    cache = tmp_path / "c.h5"
    rc = main(["data", "prepare", "--source", str(_tree(tmp_path / "tree", n)), "--cache", str(cache)])
    _assert_one_line(capsys, rc, f"{n} class folders under train/ and test/")
    assert not cache.exists()


DATA_CASES = {  # id: (arguments after `data prepare --source TREE`, the text of the one line)
    "cache a folder": (lambda t: ["--cache", str(t)], "is a folder; name the cache file"),
    "cache under a file": (lambda t: ["--cache", str(t / "afile" / "c.h5")], "is not a folder this user may write"),
    "negative split seed": (lambda t: ["--cache", str(t / "c.h5"), "--split-seed", "-1"], "--split-seed: expected"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_options_are_one_line(case, tmp_path, sources, capsys):
    (tmp_path / "afile").write_text("x")
    args, message = DATA_CASES[case]
    _assert_one_line(capsys, main(["data", "prepare", "--source", str(sources["png"]), *args(tmp_path)]), message)
    assert not list(tmp_path.rglob("*.h5"))


TRAIN_CASES = {  # id: (train flags, the text of the one line)
    "width inf": (["--width", "inf"], "width: must be a finite number"),
    "l2 nan": (["--l2-coef", "nan"], "l2_coef: must be a finite number"),
    "batch beyond the split": (["--batch-size", "100000"], "batch_size: 100000 is more than the 40000 training"),
    "train subset of 3": (["--train-size", "3"], "train_size: must be in [10,"),
    "train subset beyond the cache": (["--train-size", "1000"], "train_size: 1000, but the train split"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_bad_train_flags_are_one_line(case, tmp_path, tiny_cache, capsys):
    flags, message = TRAIN_CASES[case]
    out = tmp_path / "trial"
    _assert_one_line(capsys, main(["train", "--data", str(tiny_cache), "--width", "0.125", "--epochs", "1",
                                   *flags, "--out", str(out)]), message)
    assert not (out / "checkpoint.pt").exists()


def test_train_out_that_is_a_file_is_one_line(tmp_path, tiny_cache, capsys):
    (tmp_path / "afile").write_text("mine")
    _assert_one_line(capsys, main(["train", "--data", str(tiny_cache), "--out", str(tmp_path / "afile")]),
                     "--out " + str(tmp_path / "afile") + ": is a file")
    assert (tmp_path / "afile").read_text() == "mine"


def test_compile_where_it_cannot_apply_says_it_is_ignored(tmp_path, tiny_cache, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip(reason="this machine has CUDA, where --compile applies")
    rc = main(["train", "--data", str(tiny_cache), "--width", "0.125", "--epochs", "1", "--train-size", "100",
               "--batch-size", "32", "--precision", "fp32", "--compile", "--out", str(tmp_path / "trial")])
    err = capsys.readouterr().err
    assert rc == 0 and "vgg-xai: warning: compile: torch.compile is used on CUDA only; ignored on cpu" in err


def _assert_one_line(capsys, rc: int, message: str) -> None:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith(STAGE)]  # not how far it got
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("vgg-xai: error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err


def _recoded(tiny_cache: Path, out: Path, classes: list[str], relabel) -> Path:
    """A copy of the cache whose labels and class names are changed and whose digest is made again:
    a cache of another data set, not a damaged one."""
    import json
    import shutil

    import h5py

    from vgg_xai.data import content_digest, load_cache

    shutil.copy(tiny_cache, out)
    with h5py.File(out, "r+") as f:
        f.attrs["classes"] = json.dumps(classes)
        for split in ("train", "valid", "test"):
            f[split]["labels"][...] = relabel(f[split]["labels"][...])
    digest = content_digest(load_cache(out).splits)
    with h5py.File(out, "r+") as f:
        f.attrs["content_sha256"] = digest
    return out


@pytest.mark.parametrize("case", ["damaged", "9 classes", "11 labels"])
def test_train_refuses_the_caches_a_sweep_refuses(case, tmp_path, tiny_cache, capsys):
    """`train` opens its cache as `sweep` does: damaged bytes, or a data set of other classes, are one line
    before any work (they trained to chance, or ended in an IndexError after the first batches)."""
    if case == "damaged":
        cache, message = damaged_copy(tiny_cache, tmp_path / "c.h5"), "the data cache is damaged"
    elif case == "9 classes":
        cache = _recoded(tiny_cache, tmp_path / "c.h5", [f"c{i}" for i in range(9)], lambda y: y % 9)
        message = "holds 9 classes (labels 0 to 8), where the model has 10 outputs"
    else:
        cache = _recoded(tiny_cache, tmp_path / "c.h5", [f"c{i}" for i in range(11)], lambda y: y + (y == 9))
        message = "holds 11 classes (labels 0 to 10), where the model has 10 outputs"
    out = tmp_path / "trial"
    _assert_one_line(capsys, main(["train", "--data", str(cache), "--width", "0.125", "--epochs", "1",
                                   "--out", str(out)]), message)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("command", ["sweep", "train"])
def test_a_torchvision_built_for_another_torch_stops_before_the_first_epoch(command, tmp_path, tiny_cache):
    """A torchvision whose compiled operators do not match torch fails on import, as such a build does; a
    trial imports it only to record its version at the end, so the sweep (before Ray starts) and `train`
    (before training) check the install first."""
    import subprocess
    import sys

    broken = tmp_path / "site" / "torchvision"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = {**__import__("os").environ, "PYTHONPATH": f"{broken.parent}:{Path(__file__).parents[1]}"}
    argv = (["sweep", str(_spec(tmp_path, tiny_cache))] if command == "sweep" else
            ["train", "--data", str(tiny_cache), "--out", str(tmp_path / "trial"), "--width", "0.125", "--epochs", "1"])
    r = subprocess.run([sys.executable, "-m", "vgg_xai.cli", *argv], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(
        "vgg-xai: error: torchvision does not work with the installed torch "), r.stderr
    assert "(operator torchvision::nms does not exist); install the torchvision built for this torch" in r.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "trial" / "history.csv").exists()
