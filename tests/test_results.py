"""`vgg-xai results`: the tables it prints read back to the numbers of the trial folders, and
`results pull` copies the small files of a sweep and never its checkpoints or feature dumps.

The sweep folder is written by hand in the real formats (TrialConfig's config.json, TrialResult's
result.json, history.csv, torch checkpoints, HDF5 dumps, post-processing's metrics.json)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image

from conftest import FAKE_SSH
from vgg_xai.cli import main
from vgg_xai.config import TrialConfig
from vgg_xai.results import (INTERPRET_COLUMNS, INTERPRET_METRICS, LOWER_IS_BETTER, METRICS, ROW_COLUMNS, collect_rows,
                             format_pivot, json_rows, pivot, pull_filters, ranked, write_tables)
from vgg_xai.train import HISTORY_COLUMNS, TrialResult

# (variant, schedule) -> test accuracy per seed; bn_augment has an underscore for LaTeX to escape.
ACC = {("plain", "const_1e-3"): [0.61, 0.6325], ("plain", "alternate"): [0.55, 0.5871],
       ("bn_augment", "const_1e-3"): [0.7137, 0.7421], ("bn_augment", "alternate"): [0.6903, 0.7019]}
FAILED = TrialConfig(variant="plain", lr_schedule="alternate", seed=2, width=0.125, epochs=3, data="/c.h5")
NOT_INTERPRETED = "bn_augment-lralt-s1"  # completed, but post-processing has not reached it
ARI = lambda acc: round(acc * 0.9 - 0.1, 6)  # noqa: E731 - some distinct value per trial


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)


def _h5(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.zeros((8, 16), np.float32))


def make_sweep(root: Path) -> tuple[Path, set[str]]:
    """A finished sweep folder with post-processing's outputs and the heavy files a real one has;
    returns it and the relative paths `pull` must copy."""
    sweep = root / "seed"
    small: set[str] = set()

    def put(rel: str, text: str) -> None:
        (sweep / rel).parent.mkdir(parents=True, exist_ok=True)
        (sweep / rel).write_text(text)
        small.add(rel)

    def trial(cfg: TrialConfig, acc: float | None) -> Path:
        d = sweep / "trials" / cfg.trial_id
        rel = f"trials/{cfg.trial_id}"
        put(f"{rel}/config.json", cfg.to_json())
        put(f"{rel}/attempts.jsonl", json.dumps({"attempt": 1, "pid": 123, "start_epoch": 0}) + "\n")
        torch.save({"model": {"w": torch.zeros(2, 2)}}, d / "checkpoint_init.pt")
        torch.save({"model": {"w": torch.ones(2, 2)}, "epoch": 3, "config": cfg.to_dict()}, d / "checkpoint.pt")
        (d / ".checkpoint.pt.tmp4242").write_bytes(b"half written")
        valid = [0.3, acc - 0.01, acc - 0.02] if acc is not None else [0.3]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
        w.writeheader()
        for e, va in enumerate(valid, 1):
            w.writerow(dict(epoch=e, lr=1e-3, train_loss=1.0, train_acc=0.5, valid_loss=1.1, valid_acc=va,
                            seconds=1.0, images_per_s=900.0, status="ok"))
        put(f"{rel}/history.csv", buf.getvalue())
        if acc is None:
            put(f"{rel}/error.txt", "Traceback ...\nRuntimeError: boom\n")
            return d
        result = TrialResult(trial_id=cfg.trial_id, status="completed", epochs_completed=3, best_valid_acc=acc - 0.01,
                             best_epoch=2, test_loss=0.9, test_acc=acc, wall_s=12.5)
        put(f"{rel}/result.json", json.dumps(asdict(result), indent=2))
        _h5(d / "features.h5")
        if cfg.trial_id != NOT_INTERPRETED:
            summary = {"test_acc": acc, "ece": 0.05, "ari": ARI(acc), "nmi": 0.4, "purity": 0.6,
                       "deletion_auc": 0.2, "insertion_auc": 0.7, "deletion_auc_random": 0.3}  # no sanity_rho
            put(f"{rel}/interpret/metrics.json",
                json.dumps({"schema": "vgg-xai/interpret/1", "trial_id": cfg.trial_id, "summary": summary}))
            for name in ("curves", "cam"):
                _png(d / "interpret" / f"{name}.png")
                small.add(f"{rel}/interpret/{name}.png")
            _h5(d / "interpret" / "arrays.h5")
            (d / "interpret" / ".lock").touch()
        else:  # post-processing failed on this trial: its error is pulled too
            put(f"{rel}/interpret/error.txt", "Traceback ...\nValueError: bad checkpoint\n")
        return d

    for (variant, schedule), accs in ACC.items():
        for seed, acc in enumerate(accs):
            trial(TrialConfig(variant=variant, lr_schedule=schedule, seed=seed, width=0.125, epochs=3,
                              data="/c.h5"), acc)
    trial(FAILED, None)
    put("spec.yaml", "name: seed\n")
    put("report.html", "<html><body>report</body></html>\n")
    write_tables(sweep)
    small |= {f"tables/{name}.{ext}" for name in ("accuracy", "compare") for ext in ("csv", "md", "json")}
    (sweep / "tables" / ".accuracy.csv.tmp77").write_text("partial")
    for rel in ("figures/accuracy.png", "figures/grids/cam_grid.png"):
        _png(sweep / rel)
        small.add(rel)
    (sweep / "ray" / "experiment").mkdir(parents=True)
    (sweep / "ray" / "experiment" / "experiment_state.json").write_text("{}")
    return sweep, small


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return make_sweep(tmp_path_factory.mktemp("results"))[0]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["results", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _expected(values: dict[tuple[str, str], list[float]]) -> dict[tuple[str, str], tuple[float, float, int]]:
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1)), len(v)) for k, v in values.items()}


def test_csv_reads_back_to_the_trials_numbers(sweep, capsys):
    rc, out, err = run(capsys, sweep, "--format", "csv")
    assert rc == 0, err
    lines = list(csv.DictReader(io.StringIO(out)))
    assert list(lines[0]) == ["variant", "schedule", "metric", "mean", "std", "ci_low", "ci_high", "n", "of",
                              "degenerate", "interpretation_failed"]
    assert {r["degenerate"] for r in lines} == {"0"}
    want = _expected(ACC)
    assert {(r["variant"], r["schedule"]) for r in lines} == set(want)
    cells = pivot(collect_rows(sweep))["cells"]
    for r in lines:
        mean, std, n = want[(r["variant"], r["schedule"])]
        assert r["metric"] == "test_acc" and int(r["n"]) == n
        assert float(r["mean"]) == pytest.approx(mean, rel=1e-14) and float(r["std"]) == pytest.approx(std, rel=1e-12)
        cell = cells[f"{r['variant']}|{r['schedule']}"]
        assert (float(r["mean"]), float(r["std"])) == (cell["mean"], cell["std"])  # full precision, no rounding
        # the 95% t-interval of the mean over the seeds, as scipy.stats computes it
        low, high = scipy.stats.t.interval(0.95, n - 1, loc=mean, scale=std / math.sqrt(n))
        assert (float(r["ci_low"]), float(r["ci_high"])) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))
    failed_cell = next(r for r in lines if (r["variant"], r["schedule"]) == ("plain", "alternate"))
    assert (failed_cell["n"], failed_cell["of"]) == ("2", "3")


def test_json_reads_back_to_the_same_numbers_as_csv(sweep, capsys):
    _, out_csv, _ = run(capsys, sweep, "--format", "csv")
    rc, out, err = run(capsys, sweep, "--format", "json")
    assert rc == 0, err
    data = json.loads(out)
    assert data["pivot"] == pivot(collect_rows(sweep))
    for r in csv.DictReader(io.StringIO(out_csv)):
        cell = data["pivot"]["cells"][f"{r['variant']}|{r['schedule']}"]
        assert cell["mean"] == float(r["mean"]) and cell["std"] == float(r["std"]) and cell["n"] == int(r["n"])
    rows = {r["trial_id"]: r for r in data["rows"]}
    assert len(rows) == 9 and list(rows["plain-lr1e-3-s0"]) == ROW_COLUMNS
    assert rows["plain-lr1e-3-s0"]["test_acc"] == 0.61 and rows["plain-lr1e-3-s0"]["ari"] == ARI(0.61)
    assert rows[FAILED.trial_id]["status"] == "failed" and rows[FAILED.trial_id]["test_acc"] is None
    assert rows[NOT_INTERPRETED]["ari"] is None and rows["plain-lr1e-3-s0"]["sanity_rho"] is None


def test_latex_is_a_booktabs_tabular_of_every_cell(sweep, capsys):
    rc, out, err = run(capsys, sweep, "--format", "latex")
    assert rc == 0, err
    for piece in ("\\begin{tabular}{lcc}", "\\toprule", "\\midrule", "\\bottomrule", "\\end{tabular}",
                  "const\\_1e-3", "bn\\_augment & ", "$\\pm$"):
        assert piece in out
    assert "bn_augment" not in out.replace("bn\\_augment", "")
    for mean, std, _ in _expected(ACC).values():
        assert f"{mean:.4f} $\\pm$ {std:.4f}" in out


def test_default_table_and_markdown(sweep, capsys):
    rc, out, _ = run(capsys, sweep)
    assert rc == 0 and out.startswith("test_acc: mean ± std over seeds [95% t-interval of the mean], n=seeds")
    assert "bn_augment" in out and "alternate" in out and " n=2/3" in out
    rc, out, _ = run(capsys, sweep, "--format", "md")
    assert rc == 0 and "| variant | const_1e-3 | alternate |" in out and "| plain |" in out


def test_metric_ari_pivots_the_interpretation_metrics(sweep, capsys):
    rc, out, err = run(capsys, sweep, "--format", "csv", "--metric", "ari")
    assert rc == 0, err
    ari = {k: [ARI(a) for s, a in enumerate(v) if f"{k[0]}-{'lr1e-3' if k[1] == 'const_1e-3' else 'lralt'}-s{s}"
               != NOT_INTERPRETED] for k, v in ACC.items()}
    for r in csv.DictReader(io.StringIO(out)):
        vals = ari[(r["variant"], r["schedule"])]
        assert r["metric"] == "ari" and int(r["n"]) == len(vals)
        assert float(r["mean"]) == pytest.approx(np.mean(vals), rel=1e-14)
        assert float(r["std"]) == pytest.approx(np.std(vals, ddof=1) if len(vals) > 1 else 0.0, abs=1e-15)
    rc, out, _ = run(capsys, sweep, "--format", "csv", "--metric", "sanity_rho")  # no trial has it
    assert rc == 0 and all(r["mean"] == "" and r["n"] == "0" for r in csv.DictReader(io.StringIO(out)))


def test_tables_hold_the_interpretation_columns_and_pivots(tmp_path):
    sweep, _ = make_sweep(tmp_path)
    header = (sweep / "tables" / "accuracy.csv").read_text().splitlines()[0].split(",")
    start = header.index("test_acc") + 1
    assert header == ROW_COLUMNS and header[start:start + len(INTERPRET_COLUMNS)] == INTERPRET_COLUMNS
    assert header[-3:-1] == ["deletion_verdict", "insertion_verdict"]
    assert header[header.index("deletion_auc"):header.index("deletion_auc") + 3] == \
        ["deletion_auc", "deletion_auc_se", "deletion_auc_random"]  # each score beside its random-map baseline
    md = (sweep / "tables" / "accuracy.md").read_text()
    assert "## Interpretation metrics" in md
    for m in INTERPRET_METRICS:  # only metrics some trial has
        assert (f"### {m}\n" in md) == (m in ("ari", "nmi", "purity", "ece", "deletion_auc", "deletion_auc_random",
                                               "insertion_auc"))
    saved = json.loads((sweep / "tables" / "accuracy.json").read_text())
    assert saved["rows"] == json_rows(collect_rows(sweep)) and saved["pivot"]["metric"] == "test_acc"


def test_without_trials_it_reads_tables_accuracy_json(sweep, tmp_path, capsys):
    copy = tmp_path / "seed"
    shutil.copytree(sweep / "tables", copy / "tables")
    for metric in ("test_acc", "ari"):
        _, want, _ = run(capsys, sweep, "--format", "json", "--metric", metric)
        rc, got, err = run(capsys, copy, "--format", "json", "--metric", metric)
        assert rc == 0, err
        assert json.loads(got)["pivot"] == json.loads(want)["pivot"]


@pytest.mark.parametrize("argv,message", [
    (["{sweep}", "--metric", "accuracy"], "metric: 'accuracy' is not one of test_acc, best_valid_acc"),
    (["{tmp}"], "not a sweep folder (no trials/ or tables/accuracy.json); pass results/<sweep>"),
    (["{tmp}/nowhere"], "not a sweep folder"),
    # a second folder is pooled with the first: one that is not a sweep folder is named
    (["{sweep}", "extra"], "extra: not a sweep folder (no trials/ or tables/accuracy.json)"),
    (["pull", "{sweep}"], "results pull: expected SRC DEST"),
    (["pull", "{sweep}", "{tmp}/d", "--format", "csv"], "--format, --metric, --sort and --top are for reading a folder"),
    (["pull", "{sweep}", "{tmp}/d", "--sort", "ari"], "--format, --metric, --sort and --top are for reading a folder"),
    (["{sweep}", "--sort", "accuracy"], "--sort: 'accuracy' is not one of test_acc, best_valid_acc"),
    (["{sweep}", "--top", "3"], "--top: ranks trials by --sort METRIC; e.g. --sort test_acc --top 3"),
    (["{sweep}", "--sort", "ari", "--top", "0"], "--top: must be >= 1, got 0"),
    (["{sweep}", "--sort", "ari", "--metric", "ari"], "--metric picks the pivot's metric, --sort the one"),
    (["{sweep}", "--sort", "ari", "--format", "latex"], "--format latex is the pivot's; with --sort use table, md"),
    (["pull", "{tmp}/nowhere", "{tmp}/d"], "no such folder"),
    (["pull", "{tmp}", "{tmp}/d"], "not a sweep folder (no trials/, tables/ or spec.yaml)"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, sweep, tmp_path, capsys):
    rc, out, err = run(capsys, *[a.format(sweep=sweep, tmp=tmp_path) for a in argv])
    assert rc == 2 and out == ""
    assert err.startswith("vgg-xai: error: ") and message in err and len(err.strip().splitlines()) == 1
    if "accuracy" in argv:
        assert ("ari, nmi, purity, ece, deletion_auc, deletion_auc_random, deletion_vs_random, deletion_wins, "
                "insertion_auc, insertion_auc_random, insertion_vs_random, insertion_wins, sanity_rho, sanity_floor, "
                "sanity_abs_rank_rho, sanity_abs_floor, wall_s") in err


# ---------------------------------------------------------------------------- --sort / --top

TEST_ACC = {f"{v}-{'lr1e-3' if s == 'const_1e-3' else 'lralt'}-s{seed}": acc
            for (v, s), accs in ACC.items() for seed, acc in enumerate(accs)}
RANK_HEAD = ["trial_id", "variant", "lr_schedule", "seed", "status", "degenerate"]
RANK_TAIL = ["test_acc", "best_valid_acc", "epochs", "wall_s"]


def test_sort_prints_the_best_trials_first(sweep, capsys):
    rc, out, err = run(capsys, sweep, "--sort", "test_acc", "--top", "3")
    assert rc == 0, err
    title, table = out.split("\n\n")
    assert title == "trials by test_acc, best first (higher is better; no value last): 3 of 9"
    lines = table.splitlines()
    assert lines[0].split() == RANK_HEAD + RANK_TAIL and set(lines[1]) <= {"-", " "}
    best = sorted(TEST_ACC, key=TEST_ACC.get, reverse=True)[:3]
    assert [x.split()[0] for x in lines[2:]] == best
    assert lines[2].split()[5:] == ["0.7421", "0.7321", "3", "12.5"]  # accuracies to 4 decimals, counts whole


def test_sort_csv_holds_every_trial_with_no_value_last(sweep, capsys):
    rc, out, err = run(capsys, sweep, "--sort", "test_acc", "--format", "csv")
    assert rc == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == RANK_HEAD + RANK_TAIL  # the metric ranked by is test_acc itself: not twice
    assert [r["trial_id"] for r in rows] == sorted(TEST_ACC, key=TEST_ACC.get, reverse=True) + [FAILED.trial_id]
    assert rows[-1]["test_acc"] == "" and rows[-1]["status"] == "failed"
    assert [float(r["test_acc"]) for r in rows[:-1]] == sorted(TEST_ACC.values(), reverse=True)


def test_sort_json_and_md_by_an_interpretation_metric(sweep, capsys):
    rc, out, err = run(capsys, sweep, "--sort", "ari", "--format", "json")
    assert rc == 0, err
    data = json.loads(out)
    assert (data["sort"], data["order"], data["top"], data["of"]) == ("ari", "descending", None, 9)
    assert list(data["rows"][0]) == RANK_HEAD + ["ari"] + RANK_TAIL
    aris = [r["ari"] for r in data["rows"]]
    assert aris[:7] == sorted(ARI(a) for t, a in TEST_ACC.items() if t != NOT_INTERPRETED)[::-1]
    assert aris[7:] == [None, None]  # no interpretation: last, in trial-id order
    assert [r["trial_id"] for r in data["rows"][7:]] == sorted([NOT_INTERPRETED, FAILED.trial_id])
    rc, out, err = run(capsys, sweep, "--sort", "best_valid_acc", "--top", "2", "--format", "md")
    assert rc == 0, err
    assert ("| trial_id | variant | lr_schedule | seed | status | degenerate | best_valid_acc | test_acc | epochs "
            "| wall_s |") in out
    assert out.count("| bn_augment-lr1e-3-") == 2 and "| 0.7321 | 0.7421 | 3 | 12.5 |" in out


@pytest.mark.parametrize("metric", METRICS)
def test_ranked_goes_the_better_way_with_missing_values_last(metric):
    values = [0.3, math.nan, 0.1, None, 0.2]
    rows = [{"trial_id": f"t{i}", metric: v} for i, v in enumerate(values)]
    got = [r["trial_id"] for r in ranked(rows, metric)]
    better_first = ["t2", "t4", "t0"] if metric in LOWER_IS_BETTER else ["t0", "t4", "t2"]
    assert got == better_first + ["t1", "t3"]
    assert [r["trial_id"] for r in ranked(rows, metric, top=2)] == better_first[:2]
    assert set(LOWER_IS_BETTER) == {"ece", "deletion_auc", "deletion_auc_random", "deletion_vs_random", "sanity_rho",
                                    "sanity_floor", "sanity_abs_rank_rho", "sanity_abs_floor", "wall_s"}


# ---------------------------------------------------------------------------- how numbers are written

def test_tables_name_their_metric_and_print_counts_whole(sweep, tmp_path, capsys):
    assert format_pivot(pivot(collect_rows(sweep))).splitlines()[0].startswith("test_acc: mean ± std over seeds")
    rc, out, _ = run(capsys, sweep, "--metric", "epochs")
    assert rc == 0 and out.startswith("epochs: mean ± std over seeds") and "3 ± 0 [3, 3] n=2/3" in out
    assert "3.0000" not in out
    rc, out, _ = run(capsys, sweep, "--metric", "wall_s", "--format", "md")
    assert rc == 0 and out.startswith("wall_s: mean ± std over seeds") and "| 12.5 ± 0.0 [12.5, 12.5] n=2 |" in out
    sweep_copy, _ = make_sweep(tmp_path)
    md = (sweep_copy / "tables" / "accuracy.md").read_text()
    assert "| completed |  | done |  | 3 | 0.6000 | 2 | 0.6100 |" in md and "| 12.5 |" in md and "12.5000" not in md


def test_float32_values_are_written_by_their_shortest_decimal(tmp_path, capsys):
    """An accuracy computed in float32 is 0.21299999952316284 as a Python float; CSV and JSON say 0.213.
    A value that is no float32 keeps every digit."""
    sweep, _ = make_sweep(tmp_path)
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    trial = sweep / "trials" / "plain-lr1e-3-s0"
    result = json.loads((trial / "result.json").read_text())
    result.update(test_acc=f32(0.213), best_valid_acc=f32(0.3))
    (trial / "result.json").write_text(json.dumps(result))
    metrics = json.loads((trial / "interpret" / "metrics.json").read_text())
    metrics["summary"]["ece"] = f32(0.0437)
    (trial / "interpret" / "metrics.json").write_text(json.dumps(metrics))
    assert "0.21299999952316284" in (trial / "result.json").read_text()
    write_tables(sweep)
    texts = [(sweep / "tables" / f"accuracy.{ext}").read_text() for ext in ("csv", "json", "md")]
    for argv in (["--sort", "ece", "--format", "csv"], ["--sort", "test_acc", "--format", "json"],
                 ["--format", "json"], ["--format", "csv"]):
        rc, out, err = run(capsys, sweep, *argv)
        assert rc == 0, err
        texts.append(out)
    noise = [repr(f32(x)) for x in (0.213, 0.3, 0.0437)]
    assert noise == ["0.21299999952316284", "0.30000001192092896", "0.043699998408555984"]
    for text in texts:
        assert not [n for n in noise if n in text]
    rows = {r["trial_id"]: r for r in csv.DictReader(io.StringIO(texts[0]))}
    assert (rows["plain-lr1e-3-s0"]["test_acc"], rows["plain-lr1e-3-s0"]["ece"]) == ("0.213", "0.0437")
    assert rows["plain-lr1e-3-s1"]["best_valid_acc"] == repr(0.6325 - 0.01)  # float64: as it is
    saved = json.loads(texts[1])["rows"]
    assert next(r for r in saved if r["trial_id"] == "plain-lr1e-3-s0")["best_valid_acc"] == 0.3


def test_a_failed_interpretation_is_named_in_every_table(sweep, capsys):
    """NOT_INTERPRETED completed, but its interpretation failed (interpret/error.txt): a missing
    value in an interpretation table must say so, not read as never computed."""
    failed_note = f"no value for {NOT_INTERPRETED}: interpretation failed: ValueError: bad checkpoint"
    rows = {r["trial_id"]: r for r in csv.DictReader(io.StringIO((sweep / "tables" / "accuracy.csv").read_text()))}
    assert rows[NOT_INTERPRETED]["interpretation"] == "failed"
    assert rows[NOT_INTERPRETED]["note"] == "interpretation failed: ValueError: bad checkpoint"
    assert rows["plain-lr1e-3-s0"]["interpretation"] == "done" and rows[FAILED.trial_id]["interpretation"] == ""
    md = (sweep / "tables" / "accuracy.md").read_text()
    pivots = md.split("## Trials")[0]
    accuracy, interp = pivots.split("## Interpretation metrics")
    assert failed_note not in accuracy  # the test accuracy is there: nothing is missing
    assert interp.count(failed_note) == len(re.findall(r"^### ", interp, re.M)) == 7  # one note per pivot

    rc, out, err = run(capsys, sweep, "--metric", "ari")
    assert rc == 0, err
    # The cell averages the one seed that has a value (1/2) and the note says where the other went.
    assert f"{ARI(0.6903):.4f} n=1/2" in out and failed_note in out
    rc, out, _ = run(capsys, sweep, "--metric", "ari", "--format", "json")
    p = json.loads(out)["pivot"]
    assert p["cells"]["bn_augment|alternate"]["failed"] == [NOT_INTERPRETED]
    assert p["failed"] == {NOT_INTERPRETED: "interpretation failed: ValueError: bad checkpoint"}
    rc, out, _ = run(capsys, sweep, "--metric", "ari", "--format", "csv")
    counts = {(r["variant"], r["schedule"]): r["interpretation_failed"] for r in csv.DictReader(io.StringIO(out))}
    assert counts[("bn_augment", "alternate")] == "1" and set(counts.values()) == {"0", "1"}
    rc, out, _ = run(capsys, sweep, "--metric", "ari", "--format", "latex")
    assert "{\\footnotesize no value for bn\\_augment-lralt-s1: interpretation failed" in out
    rc, out, _ = run(capsys, sweep)  # the accuracy pivot: no such note
    assert "no value for" not in out


def test_a_cell_whose_only_interpretation_failed_says_so(tmp_path, capsys):
    sweep, _ = make_sweep(tmp_path)
    other = sweep / "trials" / "bn_augment-lralt-s0" / "interpret"
    (other / "metrics.json").unlink()
    (other / "error.txt").write_text("WorkerCrashedError: the process running it died\n")
    write_tables(sweep)
    md = (sweep / "tables" / "accuracy.md").read_text()
    assert "| bn_augment | " in md and "| interpretation failed |" in md.split("## Trials")[0]
    rc, out, _ = run(capsys, sweep, "--metric", "ari", "--format", "latex")
    assert rc == 0 and "-- \\\\" in out  # LaTeX keeps its dash for a missing value


# ---------------------------------------------------------------------------- degenerate trials, new columns

DEGENERATE = "plain-lr1e-3-s0"
REASON = "one predicted class: cat for 100% of the test images"
FAITHFUL = {"deletion_auc_se": 0.011, "deletion_auc_random_se": 0.012, "insertion_auc": 0.7, "insertion_auc_se": 0.02,
            "insertion_auc_random": 0.56, "insertion_auc_random_se": 0.03, "faithfulness_n_images": 10,
            "insertion_vs_random": 0.14, "insertion_vs_random_se": 0.01, "insertion_wins": 0.9,
            "insertion_vs_random_p": 2e-5, "sanity_rho": -0.05, "sanity_rho_std": 0.04, "sanity_floor": 0.02,
            "sanity_floor_std": 0.05, "sanity_abs_rank_rho": 0.3, "sanity_abs_rank_rho_std": 0.1,
            "sanity_abs_floor": 0.28, "sanity_abs_floor_std": 0.1, "sanity_n_draws": 3, "sanity_n_images": 10,
            "sanity_n_pairs": 30, "sanity_n_degenerate": 0}


def _edit_metrics(trial: Path, **top) -> None:
    path = trial / "interpret" / "metrics.json"
    m = json.loads(path.read_text())
    summary = top.pop("summary", {})
    m.update(top)
    m["summary"].update(summary)
    path.write_text(json.dumps(m))


def degenerate_sweep(root: Path) -> Path:
    """make_sweep's folder with post-processing's newer metrics.json in two trials: one degenerate (its
    clustering skipped, so no ARI), one checked and fine, each with the faithfulness and sanity details.
    The others keep the older metrics.json, without any of it."""
    sweep, _ = make_sweep(root)
    _edit_metrics(sweep / "trials" / DEGENERATE, degenerate={"detected": True, "reasons": [REASON], "checks": {}},
                  skipped={"gmm": "one predicted class: clusters would score a constant"},
                  summary={**FAITHFUL, "ari": None, "nmi": None, "purity": None, "test_acc": 0.61})
    _edit_metrics(sweep / "trials" / "plain-lr1e-3-s1", degenerate={"detected": False, "reasons": [], "checks": {}},
                  skipped={}, summary=FAITHFUL)
    write_tables(sweep)
    return sweep


def test_degenerate_trials_are_marked_in_every_table(tmp_path, capsys):
    sweep = degenerate_sweep(tmp_path)
    tables = sweep / "tables"
    rows = {r["trial_id"]: r for r in csv.DictReader(io.StringIO((tables / "accuracy.csv").read_text()))}
    flag = lambda t: rows[t]["degenerate"]  # noqa: E731
    assert (flag(DEGENERATE), flag("plain-lr1e-3-s1"), flag("plain-lralt-s0")) == ("true", "false", "")  # older: blank
    assert rows[DEGENERATE]["note"] == f"degenerate: {REASON}" and rows[DEGENERATE]["ari"] == ""
    saved = {r["trial_id"]: r for r in json.loads((tables / "accuracy.json").read_text())["rows"]}
    flag = lambda t: saved[t]["degenerate"]  # noqa: E731
    assert (flag(DEGENERATE), flag("plain-lr1e-3-s1"), flag(NOT_INTERPRETED)) == (True, False, None)

    footnote = f"† includes a degenerate trial: {DEGENERATE} ({REASON})"
    md = (tables / "accuracy.md").read_text()
    mean, std = np.mean(ACC[("plain", "const_1e-3")]), np.std(ACC[("plain", "const_1e-3")], ddof=1)
    low, high = scipy.stats.t.interval(0.95, 1, loc=mean, scale=std / math.sqrt(2))
    assert f"| plain | {mean:.4f} ± {std:.4f} [{low:.4f}, {high:.4f}] n=2 † |" in md and footnote in md
    assert md.count("†") == 2 * md.count(footnote) == 24  # a cell and its note: test_acc and 11 interpretation pivots
    assert "### ari\n" in md and f"| plain | {ARI(0.6325):.4f} n=1/2 |" in md  # the degenerate trial: no ARI, no mark
    assert f"| {DEGENERATE} | plain | const_1e-3 | 0 | completed | yes | done | degenerate: {REASON} |" in md
    assert "| plain-lr1e-3-s1 | plain | const_1e-3 | 1 | completed | no | done |  |" in md

    rc, out, err = run(capsys, sweep)
    assert rc == 0, err
    assert f"{mean:.4f} ± {std:.4f} [{low:.4f}, {high:.4f}] n=2 †" in out and out.rstrip().endswith(footnote)
    rc, out, _ = run(capsys, sweep, "--format", "csv")
    cells = {(r["variant"], r["schedule"]): r["degenerate"] for r in csv.DictReader(io.StringIO(out))}
    assert cells[("plain", "const_1e-3")] == "1" and set(cells.values()) == {"0", "1"}
    rc, out, _ = run(capsys, sweep, "--format", "latex")
    assert f"{mean:.4f} $\\pm$ {std:.4f} [{low:.4f}, {high:.4f}] n=2$^\\dagger$ &" in out
    assert "\\multicolumn{3}{l}{\\footnotesize $^\\dagger$ includes a degenerate trial: plain-lr1e-3-s0" in out
    rc, out, _ = run(capsys, sweep, "--format", "json")
    p = json.loads(out)["pivot"]
    assert p["cells"]["plain|const_1e-3"]["degenerate"] == [DEGENERATE] and p["degenerate"] == {DEGENERATE: REASON}

    rc, out, _ = run(capsys, sweep, "--sort", "test_acc")
    line = next(x for x in out.splitlines() if x.startswith(DEGENERATE))
    assert line.split()[4:7] == ["completed", "yes", "0.6100"]
    rc, out, _ = run(capsys, sweep, "--sort", "test_acc", "--format", "csv")
    flags = {r["trial_id"]: r["degenerate"] for r in csv.DictReader(io.StringIO(out))}
    assert (flags[DEGENERATE], flags["plain-lr1e-3-s1"], flags[FAILED.trial_id]) == ("true", "false", "")

    # The same marks from tables/accuracy.json alone (a folder without trials/).
    copy = tmp_path / "copy" / "seed"
    shutil.copytree(tables, copy / "tables")
    for argv in ([], ["--format", "json", "--metric", "sanity_abs_rank_rho"]):
        assert run(capsys, copy, *argv)[1] == run(capsys, sweep, *argv)[1]


def test_faithfulness_and_sanity_details_sit_beside_their_scores(tmp_path, capsys):
    sweep = degenerate_sweep(tmp_path)
    rows = list(csv.DictReader(io.StringIO((sweep / "tables" / "accuracy.csv").read_text())))
    row = next(r for r in rows if r["trial_id"] == "plain-lr1e-3-s1")
    assert {k: float(row[k]) for k in FAITHFUL} == FAITHFUL
    assert list(row)[list(row).index("insertion_auc"):list(row).index("insertion_auc") + 4] == \
        ["insertion_auc", "insertion_auc_se", "insertion_auc_random", "insertion_auc_random_se"]
    details = [k for k in FAITHFUL if k.endswith(("_se", "_std")) or "_n_" in k]
    assert all(r[k] == "" for r in rows if r["trial_id"] not in (DEGENERATE, "plain-lr1e-3-s1") for k in details)
    md = (sweep / "tables" / "accuracy.md").read_text()
    # Counts as whole numbers, scores to four decimals, in the trials table.
    assert ("| 0.7000 | 0.0200 | 0.5600 | 0.0300 | 0.1400 | 0.0100 | 0.9000 | 0.0000 | 10 | -0.0500 | 0.0400 | 0.0200 "
            "| 0.0500 | 0.3000 | 0.1000 | 0.2800 | 0.1000 | 3 | 10 | 30 | 0 |  | beats the random map |") in md
    assert (row["faithfulness_n_images"], row["sanity_n_pairs"]) == ("10", "30")  # counts, not 10.0
    rc, out, err = run(capsys, sweep, "--sort", "sanity_rho", "--format", "json")  # nearer 0 first
    assert rc == 0, err
    data = json.loads(out)
    assert data["order"] == "by size" and [r["sanity_rho"] for r in data["rows"][:2]] == [-0.05, -0.05]
    rc, out, _ = run(capsys, sweep, "--sort", "insertion_auc_random", "--top", "1")
    assert "higher is better" in out and "0.5600" in out


@pytest.mark.parametrize("metric, values, best", [
    ("test_acc", [0.5, 0.7, 0.6], ["b|s"]),
    ("ece", [0.05, 0.02, 0.02], ["b|s", "c|s"]),  # a tie: both
    ("sanity_rho", [-0.3, 0.2, -0.1], ["c|s"]),  # nearest 0
])
def test_best_cells_go_the_better_way_and_pass_over_degenerate_trials(metric, values, best):
    from vgg_xai.results import best_cells

    rows = [{"trial_id": f"{v}-s0", "variant": v, "lr_schedule": "s", "status": "completed", metric: x}
            for v, x in zip("abc", values)]
    assert best_cells(pivot(rows, metric)) == best
    for r in rows:
        r["degenerate"] = r["variant"] in {b.split("|")[0] for b in best}
    assert set(best_cells(pivot(rows, metric))).isdisjoint(best)  # the best cell without a degenerate trial
    for r in rows:
        r["degenerate"] = True
    assert best_cells(pivot(rows, metric)) == best  # all degenerate: still the best of them


def test_a_malformed_or_partial_metrics_file_reads_as_blank(tmp_path, capsys):
    sweep, _ = make_sweep(tmp_path)
    _edit_metrics(sweep / "trials" / DEGENERATE, degenerate="yes", skipped=["gmm"],
                  summary={"insertion_auc": "n/a", "sanity_n_draws": None})
    _edit_metrics(sweep / "trials" / "plain-lr1e-3-s1", degenerate={"reasons": "not a list"})
    write_tables(sweep)
    rows = {r["trial_id"]: r for r in json_rows(collect_rows(sweep))}
    assert rows[DEGENERATE]["degenerate"] is None and rows["plain-lr1e-3-s1"]["degenerate"] is None
    assert rows[DEGENERATE]["insertion_auc"] is None and rows[DEGENERATE]["note"] == ""
    rc, out, err = run(capsys, sweep, "--sort", "insertion_auc")
    assert rc == 0 and "†" not in out, err


def test_unknown_format_is_refused_by_argparse(sweep, capsys):
    with pytest.raises(SystemExit) as e:
        main(["results", str(sweep), "--format", "xlsx"])
    assert e.value.code == 2 and "invalid choice: 'xlsx'" in capsys.readouterr().err


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_pull_copies_exactly_the_small_files_and_twice_is_fine(tmp_path, capsys):
    sweep, small = make_sweep(tmp_path / "cluster")
    dest = tmp_path / "laptop" / "results" / "seed"
    rc, out, err = run(capsys, "pull", sweep, dest)
    assert rc == 0, err
    got = _files(dest)
    assert got == small
    assert not [f for f in got if f.endswith((".pt", ".h5")) or "/." in f or f.startswith(("ray", "."))]
    assert f"copied {len(small)} files (" in out
    rc, out, err = run(capsys, "pull", str(sweep) + "/", dest)  # again: nothing new, nothing removed
    assert rc == 0, err
    assert "up to date (0 files copied)" in out and _files(dest) == small
    # the copy reads back the same as the sweep folder
    _, a, _ = run(capsys, sweep, "--format", "json", "--metric", "ari")
    _, b, _ = run(capsys, dest, "--format", "json", "--metric", "ari")
    assert json.loads(a) == json.loads(b)


def test_pull_filters_exclude_heavy_files_before_any_include():
    rules = pull_filters()
    first_include = next(i for i, r in enumerate(rules) if r.startswith("+"))
    assert {"- *.pt", "- *.h5", "- ray/"} <= set(rules[:first_include])
    assert rules[-1] == "- *" and "+ /trials/*/interpret/metrics.json" in rules


def test_pull_without_rsync_says_to_install_it(sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    rc, _, err = run(capsys, "pull", sweep, tmp_path / "d")
    assert rc == 2 and "install rsync" in err and len(err.strip().splitlines()) == 1


def test_pull_reports_rsyncs_error(sweep, tmp_path, monkeypatch, capsys):
    fake = tmp_path / "bin" / "rsync"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'ssh: connect to host gpu01 port 22: Connection refused' >&2\n"
                    "echo 'rsync error: unexplained error (code 255) at io.c(232)' >&2\nexit 255\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    rc, _, err = run(capsys, "pull", "gpu01:/scratch/me/results/seed", tmp_path / "d")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "exit 255" in err and "Connection refused" in err and "rsync error: unexplained error" in err


def test_end_to_end_as_a_user_runs_it(sweep):
    r = subprocess.run([sys.executable, "-m", "vgg_xai.cli", "results", str(sweep), "--format", "json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pivot"] == pivot(collect_rows(sweep))


# ---------------------------------------------------------------------------- pull: paths, never options or code

@pytest.fixture
def cli_pull(tmp_path):
    """Run `vgg-xai results pull SRC DEST` as a user does, in an empty working folder, with ssh replaced
    by FAKE_SSH and rsync told to split remote arguments the old way (RSYNC_OLD_ARGS=1, as some users
    set it), so nothing but `pull` itself keeps a remote path from the remote shell."""
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "fake_ssh.py").write_text(FAKE_SSH)
    env = {**os.environ, "RSYNC_RSH": f"{sys.executable} {tmp_path / 'fake_ssh.py'}", "RSYNC_OLD_ARGS": "1"}

    def pull_(src: str, dest: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vgg_xai.cli", "results", "pull", "--", src, dest],
                              cwd=work, env=env, capture_output=True, text=True, timeout=120)
    pull_.work = work
    return pull_


@pytest.mark.parametrize("src,dest,message", [
    ("-e sh -c 'touch CANARY' x:y", "h:d", "SRC \"-e sh -c 'touch CANARY' x:y\" begins with '-'"),
    ("--rsh=sh -c 'touch CANARY' x:y", "d", "begins with '-' and would be read as an option"),
    ("localhost:{sweep}", "-e sh -c 'touch CANARY' x", "DEST \"-e sh -c 'touch CANARY' x\" begins with '-'"),
    ("{sweep}", "--version", "DEST '--version' begins with '-'"),
    ("x;touch CANARY:y", "d", "the part before ':' is not an ssh host"),
    ("$(touch CANARY):y", "d", "the part before ':' is not an ssh host"),
    ("`touch CANARY`:y", "d", "the part before ':' is not an ssh host"),
    ("u@-oProxyCommand=touch CANARY:y", "d", "the part before ':' is not an ssh host"),
    ("{sweep}", "localhost:d", "DEST 'localhost:d' looks like HOST:PATH; pull copies from a cluster to here"),
    ("{sweep}", "$(touch CANARY):d", "looks like HOST:PATH"),
    ("seed; touch CANARY", "d", "no such folder"),
    ("$(touch CANARY)", "d", "no such folder"),
    ("localhost:{sweep}; touch CANARY", "d", "failed (exit 23)"),
    ("localhost:{sweep}/$(touch CANARY)", "d", "failed (exit 23)"),
    ("localhost:{sweep}/`touch CANARY`", "d", "failed (exit 23)"),
])
def test_pull_runs_no_text_of_src_or_dest(src, dest, message, sweep, cli_pull):
    """Option and shell syntax in SRC or DEST: refused in one line, no command run, DEST not made."""
    src, dest = (p.format(sweep=sweep) for p in (src, dest))
    r = cli_pull(src, dest)
    assert not list(cli_pull.work.iterdir())  # no CANARY, no DEST, nothing else
    assert not (sweep / "CANARY").exists() and not (sweep.parent / "CANARY").exists()
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("vgg-xai: error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_pull_from_host_path_sends_the_path_whole(tmp_path, cli_pull):
    """HOST:PATH through a remote shell: a path with spaces and shell characters is copied as written."""
    sweep, small = make_sweep(tmp_path / "my results; $(touch CANARY) `touch CANARY`")
    r = cli_pull(f"localhost:{sweep}", "pulled")
    assert r.returncode == 0, r.stderr
    assert _files(cli_pull.work / "pulled") == small
    assert not list(tmp_path.rglob("CANARY"))


def test_pull_of_a_local_folder_with_odd_names(tmp_path, cli_pull):
    """`./` makes a name that begins with '-' or has a colon a local folder, for SRC and DEST."""
    sweep, small = make_sweep(cli_pull.work / "-cluster:copy")
    r = cli_pull("./-cluster:copy/seed", "./-here:now")
    assert r.returncode == 0, r.stderr
    assert _files(cli_pull.work / "-here:now") == small


def test_a_degenerate_note_under_a_pivot_is_one_short_line():
    from vgg_xai.results import pivot_notes

    reasons = ("every test image gets the same feature vector (feature std 0); one predicted class for all 5000 "
               "test images (ship); class activation maps of the probe images: gradcam 10 of 10 all zero")
    notes = pivot_notes({"degenerate": {"l2-lr1e-3-s0": reasons, "plain-lr1e-2-s0": "one predicted class"}})
    assert notes == ["† includes a degenerate trial: l2-lr1e-3-s0 (every test image gets the same feature vector "
                     "(feature std 0); +2 more reasons)",
                     "† includes a degenerate trial: plain-lr1e-2-s0 (one predicted class)"]
