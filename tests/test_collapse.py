"""A network that cannot learn again stops (training.stop_dead) with the status `collapsed`; one that
still can, even at chance for a few epochs, trains on. Trials on the tiny generated data set, width 1/8."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vgg_xai import checkpoint, collapse, features, trial_folder
from vgg_xai.config import TrialConfig
from vgg_xai.model import build_model
from vgg_xai.results import collect_rows, pivot
from vgg_xai.train import run_trial


CHANCE = 0.1 + 1e-6  # ten classes; accuracies are float32


def _cfg(cache, **kw) -> TrialConfig:
    return TrialConfig(**{**dict(data=str(cache), width=0.125, epochs=6, batch_size=32, precision="fp32",
                                 device="cpu"), **kw})


def _strip(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in history]


def test_the_check_changes_nothing_training_sees_and_finds_a_dead_layer():
    torch.manual_seed(0)
    net = build_model(TrialConfig(variant="bn_dropout", width=0.125))
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    net.train()
    buffers = {k: b.clone() for k, b in net.named_buffers()}
    rng = torch.get_rng_state()
    assert collapse.collapsed(net, x, y) is None  # a fresh network tells its images apart
    assert all(torch.equal(b, buffers[k]) for k, b in net.named_buffers())  # running statistics as they were
    assert torch.equal(torch.get_rng_state(), rng) and net.training
    assert all(p.grad is None for p in net.parameters())  # nothing for the optimizer to pick up

    plain = build_model(TrialConfig(variant="plain", width=0.125))
    with torch.no_grad():  # the second layer's ReLUs output zero for every image: it is dead
        plain.features.conv2.bias.fill_(-1e4)
    why = collapse.collapsed(plain, x, y)
    assert why is not None and "same feature vector" in why and "features.relu2 outputs zero" in why


@pytest.mark.slow
def test_a_collapsed_network_stops_is_tested_and_is_flagged(tiny_cache, tmp_path):
    """Plain VGG at lr 1e-2 dies on this data: with stop_dead it stops at the epoch the check finds it
    dead, its epochs up to there are those of the full run bit for bit, and the full run stays dead."""
    cfg = _cfg(tiny_cache, variant="plain", lr_schedule="const_1e-2")
    full = run_trial(dataclasses.replace(cfg, stop_dead=False), tmp_path / "full")
    out = tmp_path / "sweep" / "trials" / cfg.trial_id
    stopped = run_trial(cfg, out)

    assert full.status == "completed" and full.epochs_completed == 6
    assert stopped.status == "collapsed" and 1 <= stopped.epochs_completed < 6, stopped
    assert "same feature vector" in stopped.collapsed
    k = stopped.epochs_completed
    kept = checkpoint.load(out / "checkpoint.pt")
    assert kept["epoch"] == k - 1
    full_history = checkpoint.load(tmp_path / "full" / "checkpoint.pt")["history"]
    assert _strip(kept["history"]) == _strip(full_history[:k])
    # the full run's network stayed collapsed to its last epoch
    net = build_model(cfg)
    net.load_state_dict(checkpoint.load(tmp_path / "full" / "checkpoint.pt")["model"])
    from vgg_xai.data import load_splits
    splits, _ = load_splits(cfg.data, torch.device("cpu"))
    assert collapse.collapsed(net, *collapse.probe_batch(splits["train"])) is not None
    assert {r["train_acc"] for r in full_history[k:]} == {full_history[k]["train_acc"]}

    # tested like every trial, its features dumped, and shown degenerate with the epoch it stopped at
    assert stopped.test_acc == stopped.test_acc and features.read(out / "features.h5").features.shape[0] > 0
    assert trial_folder.read_result(out)["status"] == "collapsed"
    row, = collect_rows(tmp_path / "sweep")
    assert row["status"] == "collapsed" and row["degenerate"] is True
    assert row["note"].startswith(f"collapsed: stopped after epoch {k}, every one of")
    cell = pivot([row], "test_acc")["cells"]["plain|const_1e-2"]
    assert cell["n"] == 1 and cell["degenerate"] == [cfg.trial_id]

    # more epochs later: it is still collapsed, and nothing is trained again
    again = run_trial(dataclasses.replace(cfg, epochs=8), out, resume=True)
    assert again.status == "collapsed" and again.epochs_completed == k
    assert checkpoint.load(out / "checkpoint.pt")["epoch"] == k - 1


@pytest.mark.slow
def test_a_late_learner_is_never_stopped(tiny_cache, tmp_path):
    """L2 at lr 1e-2 sits at chance for its first epochs on this data and then learns; plain at lr 1e-3
    is at chance in its first epoch. Neither is stopped."""
    late = run_trial(_cfg(tiny_cache, variant="l2", lr_schedule="const_1e-2"), tmp_path / "l2")
    history = checkpoint.load(tmp_path / "l2" / "checkpoint.pt")["history"]
    assert history[0]["valid_acc"] <= CHANCE and history[1]["valid_acc"] <= CHANCE
    assert late.status == "completed" and late.epochs_completed == 6 and late.best_valid_acc >= 0.2
    slow = run_trial(_cfg(tiny_cache, variant="plain", lr_schedule="const_1e-3", epochs=3), tmp_path / "plain")
    first = checkpoint.load(tmp_path / "plain" / "checkpoint.pt")["history"][0]
    assert first["train_acc"] <= CHANCE and slow.status == "completed" and slow.epochs_completed == 3
