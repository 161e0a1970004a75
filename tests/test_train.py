from __future__ import annotations

import csv
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from vgg_xai import checkpoint, features
from vgg_xai.config import TrialConfig
from vgg_xai.errors import UserError
from vgg_xai.train import run_trial


def _cfg(cache, **kw) -> TrialConfig:
    base = dict(data=str(cache), width=0.125, epochs=3, batch_size=32, precision="fp32", device="cpu")
    base.update(kw)
    return TrialConfig(**base)


def test_a_few_epochs_learn_the_task(tiny_cache, tmp_path):
    seen = []
    cfg = _cfg(tiny_cache, arch="simple_cnn", variant="bn", epochs=6, lr_schedule="const_1e-3")
    result = run_trial(cfg, tmp_path, report=lambda m, ckpt: seen.append((m, ckpt.is_file())))
    assert result.status == "completed" and result.epochs_completed == 6
    losses = [m["train_loss"] for m, _ in seen]
    assert losses[-1] < 0.5 * losses[0]
    assert result.best_valid_acc > 0.5 and result.test_acc > 0.5  # chance is 0.1
    assert all(saved for _, saved in seen)  # the checkpoint exists when report is called
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "train_acc", "valid_loss", "valid_acc", "seconds",
                            "images_per_s", "status"}


def test_interrupted_and_resumed_equals_uninterrupted(tiny_cache, tmp_path):
    # every source of randomness on: shuffling, dropout, augmentation, an lr change
    cfg = _cfg(tiny_cache, variant="all_on", bn=True, dropout=True, l2=True, augment=True,
               lr_schedule="alternate")
    full = run_trial(cfg, tmp_path / "full")

    class Stop(Exception):
        pass

    def stop_after_first(m, _):
        if m["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        run_trial(cfg, tmp_path / "cut", report=stop_after_first)
    assert checkpoint.load(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 0
    resumed = run_trial(cfg, tmp_path / "cut", resume=True)

    a = checkpoint.load(tmp_path / "full" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "cut" / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    assert (full.test_acc, full.best_valid_acc) == (resumed.test_acc, resumed.best_valid_acc)
    fa, fb = features.read(tmp_path / "full" / "features.h5"), features.read(tmp_path / "cut" / "features.h5")
    assert np.array_equal(fa.features, fb.features)
    # the init weights were kept from the first start and differ from the trained ones
    init = checkpoint.load(tmp_path / "cut" / "checkpoint_init.pt")["model"]
    assert not torch.equal(init["features.conv1.weight"], b["model"]["features.conv1.weight"])


def test_wall_time_counts_every_attempt_and_keeps_the_last_apart(tiny_cache, tmp_path):
    """A trial stopped after its first epoch and resumed: result.json's wall_s holds the first attempt's
    epoch as well as the whole second attempt (attempt_s); a fresh start in the same folder is one attempt."""

    class Stop(Exception):
        pass

    def stop_after_first(m, _):
        if m["epoch"] == 1:
            raise Stop

    cfg = _cfg(tiny_cache, variant="bn", epochs=3)
    with pytest.raises(Stop):
        run_trial(cfg, tmp_path, report=stop_after_first)
    time.sleep(1.0)  # a pause between the attempts, which no attempt's time may count
    result = run_trial(cfg, tmp_path, resume=True)
    saved = json.loads((tmp_path / "result.json").read_text())
    seconds = [float(r["seconds"]) for r in csv.DictReader(open(tmp_path / "history.csv"))]
    assert len(seconds) == 3 and saved["attempts"] == result.attempts == 2
    assert saved["wall_s"] == result.wall_s and saved["attempt_s"] == result.attempt_s
    # the first attempt's epoch plus the whole of the second, which holds epochs 2 and 3
    assert saved["wall_s"] == pytest.approx(seconds[0] + saved["attempt_s"])
    assert saved["attempt_s"] > seconds[1] + seconds[2] and saved["wall_s"] > sum(seconds)
    log = (tmp_path / "trial.log").read_text().splitlines()
    assert log[-1].endswith(f"; {saved['wall_s']:.1f} s over 2 attempts, {saved['attempt_s']:.1f} s this one")

    fresh = run_trial(cfg, tmp_path)  # from scratch in the same folder: the earlier attempts are another training
    assert fresh.attempts == 1 and fresh.wall_s == fresh.attempt_s
    assert len((tmp_path / "attempts.jsonl").read_text().splitlines()) == 3


def test_resume_refuses_another_configuration(tiny_cache, tmp_path):
    run_trial(_cfg(tiny_cache, epochs=1), tmp_path)
    with pytest.raises(UserError, match="differs in width"):
        run_trial(_cfg(tiny_cache, epochs=2, width=0.25), tmp_path, resume=True)


def test_non_finite_loss_is_recorded_as_diverged(tiny_cache, tmp_path):
    cfg = _cfg(tiny_cache, variant="plain", epochs=3)
    run_trial(cfg.replace(epochs=1), tmp_path)
    # weights that overflow: the next epoch's loss is not finite
    ckpt = checkpoint.load(tmp_path / "checkpoint.pt")
    ckpt["model"]["features.conv2.weight"].fill_(3e38)
    checkpoint.save(ckpt, tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()

    result = run_trial(cfg, tmp_path, resume=True)
    assert result.status == "diverged"
    assert result.epochs_completed == 1 and np.isnan(result.test_acc)
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [r["status"] for r in rows] == ["ok", "diverged"]
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # the last checkpoint is kept as it was
    saved = json.loads((tmp_path / "result.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    assert saved["status"] == "diverged" and saved["test_acc"] is None and saved["test_loss"] is None
    from vgg_xai.results import collect_rows

    sweep = tmp_path.parent / f"{tmp_path.name}-sweep"  # a sweep folder around this one trial
    (sweep / "trials").mkdir(parents=True)
    (sweep / "trials" / "plain-lr1e-3-s0").symlink_to(tmp_path)
    (row,) = collect_rows(sweep)
    assert row["status"] == "diverged" and np.isnan(row["test_acc"])


def test_features_dump_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    dump = features.FeatureDump(
        features=rng.normal(size=(50, 512)).astype(np.float32), logits=rng.normal(size=(50, 10)).astype(np.float32),
        labels=rng.integers(0, 10, 50), predictions=rng.integers(0, 10, 50),
        history={"epoch": np.arange(1, 4), "valid_acc": np.array([0.1, 0.2, 0.3]),
                 "status": np.array(["ok", "ok", "diverged"])},
        config={"variant": "bn", "width": 0.125}, classes=[f"c{i}" for i in range(10)],
        versions={"torch": torch.__version__}, git_commit="abc",
    )
    features.write(tmp_path / "f.h5", dump)
    back = features.read(tmp_path / "f.h5")
    for k in ("features", "logits", "labels", "predictions"):
        assert np.array_equal(getattr(back, k), getattr(dump, k))
    assert list(back.history["status"]) == ["ok", "ok", "diverged"]
    assert np.array_equal(back.history["valid_acc"], dump.history["valid_acc"])
    assert (back.config, back.classes, back.versions, back.git_commit) == \
        (dump.config, dump.classes, dump.versions, dump.git_commit)
    with pytest.raises(ValueError, match="same length"):
        features.write(tmp_path / "g.h5", features.FeatureDump(**{**dump.__dict__, "labels": dump.labels[:3]}))
    assert not (tmp_path / "g.h5").exists()


def test_trial_writes_features_with_provenance(tiny_cache, tmp_path):
    result = run_trial(_cfg(tiny_cache, variant="bn", epochs=1), tmp_path)
    dump = features.read(tmp_path / "features.h5")
    assert dump.features.shape == (100, 512) and dump.features.dtype == np.float32
    assert dump.logits.shape == (100, 10)
    assert np.array_equal(dump.predictions, dump.logits.argmax(1))
    assert abs((dump.predictions == dump.labels).mean() - result.test_acc) < 1e-6
    assert dump.config == TrialConfig.from_dict(json.loads((tmp_path / "config.json").read_text())).to_dict()
    assert {"torch", "torchvision", "kornia", "vgg_xai"} <= set(dump.versions)
    assert list(dump.history["epoch"]) == [1]


def test_checkpoints_load_weights_only(tiny_cache, tmp_path):
    run_trial(_cfg(tiny_cache, epochs=1), tmp_path)
    for name in ("checkpoint.pt", "checkpoint_init.pt"):
        d = torch.load(tmp_path / name, weights_only=True)
        assert set(d) >= {"model", "config", "epoch"}


def test_bf16_autocast_trains_on_cpu_and_the_test_dump_is_fp32(tiny_cache, tmp_path):
    """Trained under bf16 autocast, the test-set dump is the fp32 computation the interpretation
    suite repeats: the same logits as an fp32 forward pass of the checkpoint, and it says so."""
    from vgg_xai.data import load_splits
    from vgg_xai.model import build_model

    cfg = _cfg(tiny_cache, variant="bn", epochs=1, precision="bf16")
    result = run_trial(cfg, tmp_path)
    assert result.status == "completed" and np.isfinite(result.test_loss)
    dump = features.read(tmp_path / "features.h5")
    assert dump.precision == "fp32"
    net = build_model(cfg)
    net.load_state_dict(checkpoint.load(tmp_path / "checkpoint.pt")["model"])
    net.eval()
    test = load_splits(cfg.data, torch.device("cpu"))[0]["test"]
    with torch.no_grad():
        logits = torch.cat([net(x) for x, _ in test.batches(cfg.batch_size)]).numpy()
    np.testing.assert_allclose(dump.logits, logits, rtol=1e-4, atol=1e-4)
    assert np.array_equal(dump.predictions, logits.argmax(1))
    assert result.test_acc == pytest.approx((dump.predictions == dump.labels).mean())


def test_cli_train_from_yaml_with_flag_override(tiny_cache, tmp_path):
    spec = tmp_path / "trial.yaml"
    spec.write_text(f"data: {tiny_cache}\nvariant: l2\nwidth: 0.125\nepochs: 3\nbatch_size: 64\n"
                    "precision: fp32\n")
    r = subprocess.run([sys.executable, "-m", "vgg_xai.cli", "train", "--config", str(spec), "--epochs", "1",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "epoch   1" in r.stdout
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["variant"], cfg["epochs"], cfg["l2"], cfg["batch_size"]) == ("l2", 1, True, 64)
    bad = subprocess.run([sys.executable, "-m", "vgg_xai.cli", "train", "--config", str(spec), "--variant",
                          "huge", "--out", str(tmp_path / "o2")], capture_output=True, text=True)
    assert bad.returncode == 2 and "variant: 'huge' is not a preset" in bad.stderr
