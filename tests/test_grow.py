"""A sweep grows: a changed spec keeps every trial whose settings are unchanged, trains the new ones,
continues the unfinished ones and the finished ones given more epochs, and leaves the trials it no
longer lists on disk, out of the tables. Trials here are real (width 1/8 on the tiny data set)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vgg_xai import checkpoint, sweep
from vgg_xai.config import JobSpec, TrialConfig
from vgg_xai.errors import UserError
from vgg_xai.monitor import status
from vgg_xai.results import collect_rows
from vgg_xai.train import run_trial

BN = {"variant": ["bn"], "lr_schedule": ["const_1e-3"]}


def _spec(tmp_path: Path, cache: Path, grid, epochs: int = 1, **top) -> JobSpec:
    d = {"name": "g", "data": {"source": str(cache)}, "model": {"width": 0.125}, "grid": grid,
         "training": {"epochs": epochs, "batch_size": 64, "precision": "fp32"}, "resources": {"cpu": 1},
         "retries": 0, "results": str(tmp_path / "results"), **top}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(d))
    return JobSpec.from_yaml(path)


def _train(p: sweep.Plan, *ids: str) -> None:
    """Train the plan's trials ``ids`` to their end in their folders, as a sweep's trial does."""
    for tid, cfg in p.trials:
        if tid in ids:
            run_trial(cfg, p.trial_dir(tid), resume=True)


def _attempts(trial_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (trial_dir / "attempts.jsonl").read_text().splitlines()]


def test_a_list_of_grids_is_their_union_and_a_shared_trial_counts_once(tmp_path, tiny_cache):
    """The README's case: the whole 5 x 3 grid at seed 0, and plain and bn at lr 1e-3 over seeds 0-4."""
    whole = {"variant": ["plain", "bn", "bn_dropout", "l2", "bn_augment"],
             "lr_schedule": ["const_1e-3", "const_1e-2", "alternate"], "seed": [0]}
    seeds = {"variant": ["plain", "bn"], "lr_schedule": "const_1e-3", "seed": [0, 1, 2, 3, 4]}
    ids = [t for t, _ in _spec(tmp_path, tiny_cache, [whole, seeds]).trials("x")]
    assert len(ids) == 15 + 8 and len(set(ids)) == 23
    assert ids[:15] == [t for t, _ in _spec(tmp_path, tiny_cache, whole).trials("x")]
    assert sorted(ids[15:]) == sorted(f"{v}-lr1e-3-s{s}" for v in ("plain", "bn") for s in (1, 2, 3, 4))
    # a setting that differs between the grids names the trials it tells apart
    two = _spec(tmp_path, tiny_cache, [BN, {**BN, "batch_size": 32}], training={"epochs": 1})
    assert [t for t, _ in two.trials("x")] == ["bn-lr1e-3-s0-batch_size128", "bn-lr1e-3-s0-batch_size32"]
    with pytest.raises(UserError, match=r"grid\[1\]: unknown key\(s\) colour"):
        _spec(tmp_path, tiny_cache, [BN, {"colour": ["red"]}])
    with pytest.raises(UserError, match=r"width is set in both model and grid\[0\]; set it once"):
        _spec(tmp_path, tiny_cache, [{**BN, "width": [0.25]}])
    with pytest.raises(UserError, match=r"grid: an empty list of grids gives no trials"):
        _spec(tmp_path, tiny_cache, [])


def test_a_grown_spec_keeps_adds_continues_and_leaves_out(tmp_path, tiny_cache, capsys):
    first = _spec(tmp_path, tiny_cache, {"variant": ["plain", "bn"], "lr_schedule": ["const_1e-3"]})
    p = sweep.plan(first)
    _train(p, "plain-lr1e-3-s0", "bn-lr1e-3-s0")
    sweep_dir = p.sweep_dir
    capsys.readouterr()

    # more seeds of bn: two new trials, the two finished ones kept
    grown = _spec(tmp_path, tiny_cache, [{"variant": ["plain", "bn"], "lr_schedule": ["const_1e-3"]},
                                         {**BN, "seed": [1, 2]}])
    dry = sweep.plan(grown, dry_run=True)
    assert dry.growth.line() == "+2 new trials, 2 kept, 0 retrained"
    text = sweep.describe(dry)
    assert "change: +2 new trials, 2 kept, 0 retrained" in text and text.count("[finished]") == 2
    assert text.count("[to run]") == 2 and not (sweep_dir / "trials" / "bn-lr1e-3-s1").exists()  # wrote nothing
    p = sweep.plan(grown)
    assert capsys.readouterr().err == "sweep g: +2 new trials, 2 kept, 0 retrained\n"
    assert [t for t, _ in p.pending()] == ["bn-lr1e-3-s1", "bn-lr1e-3-s2"]
    _train(p, "bn-lr1e-3-s1")  # bn-lr1e-3-s2 is left planned, never started

    # bn only, two epochs: plain is outside the spec; the finished bn trials go on to epoch 2
    longer = _spec(tmp_path, tiny_cache, {**BN, "seed": [0, 1, 2]}, epochs=2)
    p = sweep.plan(longer)
    g = p.growth
    assert (g.kept, g.new, g.retrained, g.outside) == ([], [], [], ["plain-lr1e-3-s0"])
    assert g.longer == ["bn-lr1e-3-s0", "bn-lr1e-3-s1"] and g.continued == ["bn-lr1e-3-s2"]
    assert g.why["bn-lr1e-3-s0"] == "epochs: 1 -> 2"
    assert capsys.readouterr().err == ("sweep g: +0 new trials, 0 kept, 0 retrained, 1 continued, 2 continued to "
                                       "more epochs, 1 outside the spec (kept on disk, left out of the tables)\n")
    assert len(p.pending()) == 3 and (sweep_dir / "trials" / "plain-lr1e-3-s0" / "result.json").is_file()
    _train(p, "bn-lr1e-3-s0")
    a = _attempts(sweep_dir / "trials" / "bn-lr1e-3-s0")
    assert [x["start_epoch"] for x in a] == [0, 1]  # on from its last checkpoint, not trained again

    rows = collect_rows(sweep_dir)
    assert [r["trial_id"] for r in rows] == ["bn-lr1e-3-s0", "bn-lr1e-3-s1", "bn-lr1e-3-s2"]
    assert rows[0]["status"] == "completed" and rows[0]["epochs"] == 2
    text = sweep.describe(sweep.plan(longer, dry_run=True))
    assert "bn-lr1e-3-s0 " in text and "epochs 2  [finished]" in text
    assert text.count("[to continue]") == 1 and text.count("[to run]") == 1  # s1 has a checkpoint, s2 none
    view = status(sweep_dir)
    assert "1 trial folders outside the spec (kept on disk, left out of the tables): plain-lr1e-3-s0" in view
    assert "plain-lr1e-3-s0  " not in view  # not a row of the table


def test_a_changed_trial_is_trained_anew_its_old_folder_set_aside(tmp_path, tiny_cache):
    """A custom variant redefined: its trials train anew (the old folders kept in replaced/), the rest is
    kept. A change to every trial keeps nothing and is refused."""
    mine = {"bn": True, "dropout": False, "l2": False, "augment": False}
    grid = {"variant": ["bn", "mine"], "lr_schedule": ["const_1e-3"]}
    p = sweep.plan(_spec(tmp_path, tiny_cache, grid, variants={"mine": mine}))
    _train(p, "bn-lr1e-3-s0", "mine-lr1e-3-s0")
    p = sweep.plan(_spec(tmp_path, tiny_cache, grid, variants={"mine": {**mine, "dropout": True}}))
    assert (p.growth.kept, p.growth.retrained) == (["bn-lr1e-3-s0"], ["mine-lr1e-3-s0"])
    assert p.growth.why["mine-lr1e-3-s0"] == "dropout: False -> True"
    aside, = (p.sweep_dir / "replaced").iterdir()
    assert aside.name.startswith("mine-lr1e-3-s0.") and (aside / "result.json").is_file()
    assert [t for t, _ in p.pending()] == ["mine-lr1e-3-s0"]
    with pytest.raises(UserError, match=r"every trial's settings changed \(batch_size: 64 -> 32\): nothing would "
                                        r"be kept\); run it under another name, or pass --force-new"):
        sweep.plan(_spec(tmp_path, tiny_cache, grid, variants={"mine": {**mine, "dropout": True}},
                         training={"epochs": 1, "batch_size": 32, "precision": "fp32"}))


def test_more_epochs_continue_bitwise_as_if_trained_that_long(tmp_path, tiny_cache):
    """A finished trial given a third epoch ends with the weights and history of one trained three
    epochs from the start (its schedule is by epoch index, not by the total length)."""
    cfg = TrialConfig(data=str(tiny_cache), width=0.125, epochs=2, batch_size=32, precision="fp32", device="cpu",
                      variant="bn_dropout", lr_schedule="alternate")
    run_trial(cfg, tmp_path / "grown")
    (tmp_path / "grown" / "result.json").unlink()  # as the plan of the grown sweep does
    grown = run_trial(TrialConfig(**{**cfg.to_dict(), "epochs": 3}), tmp_path / "grown", resume=True)
    straight = run_trial(TrialConfig(**{**cfg.to_dict(), "epochs": 3}), tmp_path / "straight")
    a, b = (checkpoint.load(tmp_path / d / "checkpoint.pt") for d in ("grown", "straight"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (grown.test_acc, grown.epochs_completed) == (straight.test_acc, 3)


@pytest.mark.slow
def test_growing_a_sweep_trains_only_the_new_trials(tmp_path, tiny_cache):
    """End to end with `vgg-xai sweep` on Ray: a sweep; a growth by one seed; a growth to more epochs whose
    driver is killed (SIGKILL) mid-way, then run again. Nothing finished is ever trained again."""
    from test_sweep import _descendants, _no_ray_left, _running, _wait_for

    sweep_dir, grid = tmp_path / "results" / "g", {"variant": ["plain", "bn"], "lr_schedule": ["const_1e-3"]}
    trials = sweep_dir / "trials"

    def cli(spec: JobSpec, background: bool = False):  # _spec wrote the spec to tmp_path/spec.yaml
        argv = [sys.executable, "-m", "vgg_xai.cli", "sweep", str(tmp_path / "spec.yaml")]
        if background:
            return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return subprocess.run(argv, capture_output=True, text=True, timeout=900)

    r = cli(_spec(tmp_path, tiny_cache, grid))
    assert r.returncode == 0, r.stderr
    r = cli(_spec(tmp_path, tiny_cache, [grid, {**BN, "seed": [1]}]))
    assert r.returncode == 0, r.stderr
    assert "sweep g: +1 new trials, 2 kept, 0 retrained" in r.stderr and "1 trials to run, 2 finished earlier" in r.stdout
    assert {d.name: len(_attempts(d)) for d in trials.iterdir()} == {"plain-lr1e-3-s0": 1, "bn-lr1e-3-s0": 1,
                                                                    "bn-lr1e-3-s1": 1}

    longer = _spec(tmp_path, tiny_cache, [grid, {**BN, "seed": [1]}], epochs=6)
    driver = cli(longer, background=True)
    _wait_for(lambda: any(len(_attempts(d)) > 1 and checkpoint.load(d / "checkpoint.pt")["epoch"] >= 2
                          for d in trials.iterdir()), 600, "a trial past its second epoch", driver)
    ray = _descendants(driver.pid)
    driver.kill()  # as a terminal that is closed or a node that dies: no handler runs
    driver.communicate()
    _wait_for(lambda: not _running(ray), 30, "the killed driver's Ray processes to exit")

    r = cli(longer)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sweep g: +0 new trials, 0 kept, 0 retrained, 3 continued" in r.stderr, r.stderr
    for d in trials.iterdir():
        starts = [a["start_epoch"] for a in _attempts(d)]
        assert starts.count(0) == 1 and starts[1] == 1, (d.name, starts)  # from scratch once, then on from epoch 1
    rows = collect_rows(sweep_dir)
    assert [(r["status"], r["epochs"]) for r in rows] == [("completed", 6)] * 3
    _no_ray_left()
