"""Which differences are real: every interval, test, adjusted p-value and seed count checked against
scipy.stats (or the definition, enumerated) on the same numbers, and the verdicts on the measured case
of the README (batch norm against plain VGG at lr 1e-3 over five seeds) and on cases built to be
within the noise. Sweep folders are written by hand in the real formats."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from vgg_xai import stats
from vgg_xai.cli import main
from vgg_xai.compare import BEYOND, NO_VALUE, ONE_SEED, WITHIN, compare
from vgg_xai.config import TrialConfig
from vgg_xai.results import collect_rows, pivot, pivot_latex, write_tables
from vgg_xai.train import TrialResult


def with_moments(mean: float, std: float, n: int, seed: int = 0) -> list[float]:
    """n values whose mean and std (ddof 1) are exactly ``mean`` and ``std``."""
    z = np.random.default_rng(seed).standard_normal(n)
    z = (z - z.mean()) / z.std(ddof=1)
    return (mean + std * z).tolist()


# The README's measured case: test accuracy over seeds 0-4 at lr 1e-3, width 0.125, 3 epochs.
BN, PLAIN = with_moments(0.613, 0.030, 5, 1), with_moments(0.437, 0.014, 5, 2)


# ---------------------------------------------------------------------------- the statistics, against scipy


@pytest.mark.parametrize("values", [BN, PLAIN, [0.1, 0.3], [0.5, 0.52, 0.49]])
def test_mean_interval_is_scipys_t_interval(values):
    n, m, s = len(values), np.mean(values), np.std(values, ddof=1)
    assert stats.mean_interval(values) == pytest.approx(scipy.stats.t.interval(0.95, n - 1, loc=m, scale=s / n ** .5),
                                                        rel=1e-12)
    assert scipy.stats.ttest_1samp(values, 0).confidence_interval(0.95) == pytest.approx(stats.mean_interval(values))
    assert all(math.isnan(x) for x in stats.mean_interval([0.4]))


def test_welch_matches_scipy_and_the_textbook_formula():
    t = stats.two_sample(BN, PLAIN)
    ref = scipy.stats.ttest_ind(BN, PLAIN, equal_var=False)
    assert t["test"] == "welch" and t["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    ci = ref.confidence_interval(0.95)
    assert (t["low"], t["high"]) == (pytest.approx(ci.low, rel=1e-12), pytest.approx(ci.high, rel=1e-12))
    # By hand: Welch-Satterthwaite degrees of freedom, the t quantile and the standard error of the difference.
    va, vb = 0.030 ** 2 / 5, 0.014 ** 2 / 5
    df = (va + vb) ** 2 / (va ** 2 / 4 + vb ** 2 / 4)
    half = scipy.stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert t["diff"] == pytest.approx(0.613 - 0.437, rel=1e-12)
    assert (t["low"], t["high"]) == (pytest.approx(0.176 - half, rel=1e-9), pytest.approx(0.176 + half, rel=1e-9))
    assert t["p"] == pytest.approx(2 * scipy.stats.t.sf(0.176 / math.sqrt(va + vb), df), rel=1e-9)


def _enumerated_p(a: list[float], b: list[float]) -> float:
    """The exact two-sided permutation p of the difference of means, by enumerating every split, with
    scipy's convention: twice the smaller tail, counting ties, capped at 1."""
    pooled, n = np.array(a + b), len(a)
    obs = np.mean(a) - np.mean(b)
    diffs = np.array([pooled[list(i)].mean() - np.delete(pooled, list(i)).mean()
                      for i in itertools.combinations(range(len(pooled)), n)])
    eps = 1e-14 * max(1, abs(obs))
    return min(1.0, 2 * min(np.mean(diffs <= obs + eps), np.mean(diffs >= obs - eps)))


@pytest.mark.parametrize("a, b", [([0.1] * 4 + [0.5], [0.1, 0.45, 0.5, 0.52, 0.48]),
                                  ([0.1, 0.1, 0.6], [0.5, 0.55, 0.6]), ([0.1] * 4, [0.2] * 4)])
def test_permutation_test_is_exact_and_scipys(a, b):
    t = stats.two_sample(a, b, mixed=True)
    assert t["test"] == "permutation"
    assert t["p"] == pytest.approx(_enumerated_p(a, b), rel=1e-12)
    ref = scipy.stats.permutation_test((a, b), lambda x, y: np.mean(x) - np.mean(y), n_resamples=np.inf,
                                       permutation_type="independent")
    assert t["p"] == pytest.approx(ref.pvalue, rel=1e-12)


def test_cells_without_spread_are_tested_by_permutation():
    """Every seed collapsed to the same value: Welch's t is undefined, the permutation test is exact."""
    t = stats.two_sample([0.1] * 4, [0.2] * 4)
    assert t["test"] == "permutation" and t["p"] == pytest.approx(2 / math.comb(8, 4))
    assert (t["low"], t["high"]) == (pytest.approx(-0.1), pytest.approx(-0.1))
    assert stats.two_sample([0.1] * 3, [0.1] * 3)["p"] == 1.0
    # three seeds against three can never be beyond the noise by permutation: 2/20
    assert stats.two_sample([0.1] * 3, [0.9] * 3)["p"] == pytest.approx(0.1)


def _holm_by_definition(p: list[float]) -> list[float]:
    """Holm (1979): adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)), sorted ascending."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    out = [0.0] * len(p)
    for rank, i in enumerate(order):
        out[i] = max(min(1.0, (len(p) - j) * p[order[j]]) for j in range(rank + 1))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_holm_matches_its_definition(seed):
    p = np.random.default_rng(seed).uniform(0, 0.2, 9).tolist()
    assert stats.holm(p) == pytest.approx(_holm_by_definition(p), rel=1e-12)


def test_holm_leaves_out_what_was_not_tested():
    adjusted = stats.holm([0.01, math.nan, 0.04, 0.03])
    assert math.isnan(adjusted[1])
    assert [adjusted[i] for i in (0, 2, 3)] == pytest.approx(_holm_by_definition([0.01, 0.04, 0.03]))


@pytest.mark.parametrize("diff, sd_a, sd_b", [(0.016, 0.030, 0.030), (0.05, 0.03, 0.014), (0.02, 0.01, 0.04)])
def test_seeds_needed_is_the_fewest_with_80_percent_power(diff, sd_a, sd_b):
    n = stats.seeds_needed(diff, sd_a, sd_b)
    assert stats.welch_power(diff, sd_a, sd_b, n) >= 0.8 > stats.welch_power(diff, sd_a, sd_b, n - 1)
    # the normal approximation is a lower bound close to it
    z = scipy.stats.norm.ppf(0.975) + scipy.stats.norm.ppf(0.8)
    assert math.ceil(z ** 2 * (sd_a ** 2 + sd_b ** 2) / diff ** 2) <= n <= math.ceil(z ** 2 * (sd_a ** 2 + sd_b ** 2)
                                                                                      / diff ** 2) + 3
    # and Welch's test at that many seeds finds the difference as often as the power says, at least 80%
    # of the time (simulated: 2,000 draws, a standard error of 0.009)
    rng = np.random.default_rng(0)
    hits = [scipy.stats.ttest_ind(rng.normal(diff, sd_a, n), rng.normal(0, sd_b, n), equal_var=False).pvalue < 0.05
            for _ in range(2000)]
    assert np.mean(hits) == pytest.approx(float(stats.welch_power(diff, sd_a, sd_b, n)), abs=0.03)
    assert np.mean(hits) > 0.8 - 0.03


def test_seeds_needed_without_spread_or_difference():
    assert stats.seeds_needed(0.1, 0.0, 0.0) == 4  # 2 / C(8, 4) = 0.029; with 3, 2 / C(6, 3) = 0.1
    assert stats.seeds_needed(0.0, 0.03, 0.03) is None
    assert stats.seeds_needed(1e-6, 0.03, 0.03) is None  # more than MAX_SEEDS


def test_paired_is_scipys_paired_t_with_the_share_of_wins():
    rng = np.random.default_rng(3)
    random = rng.uniform(0.2, 0.4, 260)
    better = random + rng.normal(0.05, 0.05, 260)
    p = stats.paired(better, random, higher_is_better=True)
    d = better - random
    assert p["diff"] == pytest.approx(d.mean()) and p["se"] == pytest.approx(scipy.stats.sem(d))
    assert p["p"] == pytest.approx(scipy.stats.ttest_rel(better, random).pvalue, rel=1e-12)
    assert p["wins"] == np.mean(d > 0) and p["n"] == 260 and p["beats"]
    # the same numbers for a score where lower is better: it does not beat the baseline
    assert not stats.paired(better, random, higher_is_better=False)["beats"]
    noise = stats.paired(random + rng.normal(0, 0.05, 260), random, higher_is_better=True)
    assert not noise["beats"] and noise["p"] > 0.05


# ---------------------------------------------------------------------------- comparisons of a sweep's cells


def row(variant: str, schedule: str, seed: int, value: float | None, degenerate: bool | None = None) -> dict:
    tag = {"const_1e-3": "lr1e-3", "const_1e-2": "lr1e-2", "alternate": "lralt"}[schedule]
    return {"trial_id": f"{variant}-{tag}-s{seed}", "variant": variant, "lr_schedule": schedule, "seed": seed,
            "status": "completed" if value is not None else "failed", "degenerate": degenerate, "note": "",
            "interpretation": "", "test_acc": math.nan if value is None else value}


def study_rows() -> list[dict]:
    """plain and bn at lr 1e-3 over five seeds (the README's case); bn_dropout over five seeds close to
    bn; at lr 1e-2 one seed each, plain collapsed."""
    out = [row("bn", "const_1e-3", s, v) for s, v in enumerate(BN)]
    out += [row("plain", "const_1e-3", s, v) for s, v in enumerate(PLAIN)]
    out += [row("bn_dropout", "const_1e-3", s, v) for s, v in enumerate(with_moments(0.624, 0.030, 5, 3))]
    out += [row("plain", "const_1e-2", 0, 0.1, True), row("bn", "const_1e-2", 0, 0.54),
            row("bn_dropout", "const_1e-2", 0, 0.50)]
    return out


def test_the_readme_case_is_beyond_the_noise_and_close_cells_within_it():
    c = compare(study_rows())
    assert (c["ref_variant"], c["ref_schedule"]) == ("plain", "const_1e-3")
    by = {(r["cell"], r["reference"]): r for r in c["rows"]}
    bn = by[("bn|const_1e-3", "plain|const_1e-3")]
    assert bn["verdict"] == BEYOND and bn["test"] == "welch" and bn["diff"] == pytest.approx(0.176)
    assert bn["p"] == pytest.approx(scipy.stats.ttest_ind(BN, PLAIN, equal_var=False).pvalue, rel=1e-12)
    tested = [r for r in c["rows"] if math.isfinite(r["p"])]
    assert c["tests"] == len(tested) == 2  # bn and bn_dropout against plain at lr 1e-3; the rest have one seed
    assert [r["p_holm"] for r in tested] == pytest.approx(_holm_by_definition([r["p"] for r in tested]))
    one = by[("bn|const_1e-2", "plain|const_1e-2")]
    assert one["verdict"] == ONE_SEED and one["diff"] == pytest.approx(0.44) and math.isnan(one["p"])
    # the one-seed rows are sized from the spread pooled over the three five-seed cells
    pooled = math.sqrt((0.030 ** 2 + 0.014 ** 2 + 0.030 ** 2) / 3)
    assert c["pooled_sd"] == pytest.approx(pooled) and c["pooled_dof"] == 12
    assert one["spread_from"] == "pooled within cells"
    assert one["seeds_needed"] == stats.seeds_needed(0.44, pooled, pooled)


def test_a_difference_built_within_the_noise_says_so_and_how_many_seeds_would_decide():
    rows = [row("bn", "const_1e-3", s, v) for s, v in enumerate(BN)]
    rows += [row("bn_dropout", "const_1e-3", s, v) for s, v in enumerate(with_moments(0.624, 0.030, 5, 3))]
    c = compare(rows, ref_variant="bn")
    (r,) = c["rows"]
    assert r["verdict"] == WITHIN and r["p_holm"] == r["p"] > 0.05
    assert r["ci_low"] < 0 < r["ci_high"]
    need = stats.seeds_needed(0.011, 0.030, 0.030)
    assert r["seeds_needed"] == need and r["spread_from"] == "these cells"
    new = list(range(5, need))  # seeds 0-4 are there
    assert r["add"] == ("--set 'grid.variant=[bn_dropout, bn]' --set 'grid.lr_schedule=[const_1e-3]' "
                        f"--set 'grid.seed=[{', '.join(map(str, new))}]'")


def test_a_cell_mixing_collapsed_and_learning_seeds_is_flagged_and_permuted():
    rows = [row("plain", "const_1e-2", s, v, v == 0.1) for s, v in enumerate([0.1, 0.1, 0.1, 0.38, 0.41])]
    rows += [row("bn", "const_1e-2", s, v, False) for s, v in enumerate(with_moments(0.54, 0.03, 5, 4))]
    c = compare(rows, ref_schedule="const_1e-2")
    (r,) = c["rows"]
    assert r["mixed"] and r["test"] == "permutation"
    assert r["p"] == pytest.approx(_enumerated_p([v for v in with_moments(0.54, 0.03, 5, 4)],
                                                 [0.1, 0.1, 0.1, 0.38, 0.41]), rel=1e-12)
    p = pivot(rows)
    assert p["cells"]["plain|const_1e-2"]["mixed"] and not p["cells"]["bn|const_1e-2"]["mixed"]


def test_a_cell_without_a_value_has_no_verdict():
    rows = [row("plain", "const_1e-3", 0, None), row("bn", "const_1e-3", 0, 0.6)]
    (r,) = compare(rows)["rows"]
    assert r["verdict"] == NO_VALUE and r["seeds_needed"] is None


# ---------------------------------------------------------------------------- the command and the tables


def write_sweep(root: Path, name: str, cells: dict[tuple[str, str], list[float]], width: float = 0.125,
                seeds: int = 0, compare_spec: str = "") -> Path:
    sweep = root / name
    for (variant, schedule), values in cells.items():
        for seed, acc in enumerate(values, seeds):
            cfg = TrialConfig(variant=variant, lr_schedule=schedule, seed=seed, width=width, epochs=3, data="/c.h5")
            d = sweep / "trials" / cfg.trial_id
            d.mkdir(parents=True)
            (d / "config.json").write_text(cfg.to_json())
            result = TrialResult(trial_id=cfg.trial_id, status="completed", epochs_completed=3,
                                 best_valid_acc=acc, best_epoch=3, test_loss=1.0, test_acc=acc, wall_s=10.0)
            (d / "result.json").write_text(json.dumps(asdict(result)))
    (sweep / "spec.yaml").write_text(f"name: {name}\n{compare_spec}")
    return sweep


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["results", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_compare_in_the_terminal_csv_and_json(tmp_path, capsys):
    sweep = write_sweep(tmp_path, "s", {("plain", "const_1e-3"): PLAIN, ("bn", "const_1e-3"): BN,
                                        ("plain", "const_1e-2"): [0.1], ("bn", "const_1e-2"): [0.54]})
    rc, out, err = run(capsys, sweep, "--compare")
    assert rc == 0, err
    assert out.startswith("test_acc: differences between cells over seeds (higher is better)")
    line = next(x for x in out.splitlines() if x.startswith("const_1e-3") and " bn " in x)
    assert "+0.1760 [" in line and "Welch t" in line and line.rstrip().endswith(BEYOND)
    assert "within each variant, every schedule against const_1e-3:" in out
    rc, out, _ = run(capsys, sweep, "--compare", "--format", "csv")
    lines = {(r["cell"], r["reference"]): r for r in csv.DictReader(io.StringIO(out))}
    bn = lines[("bn|const_1e-3", "plain|const_1e-3")]
    assert float(bn["p"]) == pytest.approx(scipy.stats.ttest_ind(BN, PLAIN, equal_var=False).pvalue, rel=1e-12)
    assert bn["verdict"] == BEYOND and bn["n"] == "5" and bn["metric"] == "test_acc"
    rc, out, _ = run(capsys, sweep, "--compare", "--format", "json", "--ref-variant", "bn")
    data = json.loads(out)
    assert data["ref_variant"] == "bn" and {r["reference"] for r in data["rows"] if r["kind"] == "variant"} == {
        "bn|const_1e-3", "bn|const_1e-2"}


def test_the_spec_names_the_references_and_a_flag_overrides_it(tmp_path, capsys):
    sweep = write_sweep(tmp_path, "s", {("plain", "const_1e-3"): PLAIN, ("bn", "const_1e-3"): BN,
                                        ("bn", "alternate"): [0.6, 0.62]},
                        compare_spec="compare:\n  variant: bn\n  schedule: alternate\n")
    rc, out, _ = run(capsys, sweep, "--compare", "--format", "json")
    assert (json.loads(out)["ref_variant"], json.loads(out)["ref_schedule"]) == ("bn", "alternate")
    rc, out, _ = run(capsys, sweep, "--compare", "--format", "json", "--ref-schedule", "const_1e-3")
    assert json.loads(out)["ref_schedule"] == "const_1e-3"
    rc, out, err = run(capsys, sweep, "--compare", "--ref-variant", "l2")
    assert rc == 2 and err.strip().count("\n") == 0 and "'l2' is not a variant of this sweep (plain, bn)" in err
    rc, out, err = run(capsys, sweep, "--ref-variant", "bn")
    assert rc == 2 and "add --compare" in err


def test_sweeps_of_one_study_pool_and_the_same_trial_counts_once(tmp_path, capsys):
    first = write_sweep(tmp_path, "cpu", {("plain", "const_1e-3"): PLAIN[:1], ("bn", "const_1e-3"): BN[:1]})
    more = write_sweep(tmp_path, "cpu-seeds", {("plain", "const_1e-3"): PLAIN, ("bn", "const_1e-3"): BN})
    rc, out, err = run(capsys, first, more, "--format", "csv")
    assert rc == 0, err
    cells = {r["variant"]: r for r in csv.DictReader(io.StringIO(out))}
    assert cells["bn"]["n"] == cells["plain"]["n"] == "5"  # seed 0 is in both folders: once
    rc, out, _ = run(capsys, first, more, "--compare", "--format", "json")
    (r,) = [r for r in json.loads(out)["rows"]]
    assert r["verdict"] == BEYOND and r["n"] == r["ref_n"] == 5
    other = write_sweep(tmp_path, "wide", {("bn", "const_1e-3"): [0.8, 0.81]}, width=1.0, seeds=5)
    rc, out, err = run(capsys, first, other)
    assert rc == 2 and "differ in width (1.0 against 0.125)" in err and err.count("\n") == 1


def test_tables_hold_the_comparisons(tmp_path):
    sweep = write_sweep(tmp_path, "s", {("plain", "const_1e-3"): PLAIN, ("bn", "const_1e-3"): BN})
    write_tables(sweep)
    rows = list(csv.DictReader(io.StringIO((sweep / "tables" / "compare.csv").read_text())))
    assert [(r["cell"], r["verdict"]) for r in rows] == [("bn|const_1e-3", BEYOND)]
    assert json.loads((sweep / "tables" / "compare.json").read_text())["rows"][0]["verdict"] == BEYOND
    assert BEYOND in (sweep / "tables" / "compare.md").read_text()


def test_a_cell_of_collapsed_trials_without_a_value_is_marked_in_latex():
    """A collapsed trial has no ARI (its clustering is skipped): its cell is empty, and the mark says why."""
    rows = [row("l2", "const_1e-3", 0, 0.1, True), row("bn", "const_1e-3", 0, 0.6, False)]
    for r in rows:
        r["ari"] = math.nan if r["degenerate"] else 0.3
        r["note"] = "degenerate: one predicted class" if r["degenerate"] else ""
    text = pivot_latex(pivot(rows, "ari"))
    assert "--$^\\dagger$" in text and "$^\\dagger$ includes a degenerate trial: l2-lr1e-3-s0 (one predicted class)" in text


def test_collect_rows_reads_what_write_sweep_wrote(tmp_path):
    sweep = write_sweep(tmp_path, "s", {("bn", "const_1e-3"): BN})
    assert [r["test_acc"] for r in collect_rows(sweep)] == pytest.approx(BN)


def test_the_report_says_which_differences_are_real(tmp_path):
    from vgg_xai.report import build_html

    sweep = write_sweep(tmp_path, "s", {("plain", "const_1e-3"): PLAIN, ("bn", "const_1e-3"): BN,
                                        ("plain", "const_1e-2"): [0.1], ("bn", "const_1e-2"): [0.54]})
    page = build_html(sweep)
    section = page[page.index('<h3 id="compare">'):]
    assert '<a href="#compare">' in page and "Within each schedule, every variant against plain" in section
    row = next(tr for tr in section.split("<tr>") if "+0.1760" in tr)
    assert BEYOND in row and "Welch t" in row
    assert ONE_SEED in section and "add them with --set &#x27;grid.variant=[bn, plain]&#x27;" in section


def test_the_results_root_lists_its_sweeps(tmp_path, capsys):
    write_sweep(tmp_path, "cpu", {("bn", "const_1e-3"): BN})
    write_sweep(tmp_path, "smoke", {("bn", "const_1e-3"): BN})
    (tmp_path / "data").mkdir()
    rc, out, err = run(capsys, tmp_path)
    assert rc == 2 and err.count("\n") == 1
    assert f"a folder of sweeps, not a sweep: cpu, smoke; pass one, e.g. `vgg-xai results {tmp_path / 'cpu'}`" in err


def test_without_any_cell_of_two_seeds_the_seeds_needed_are_unknown_and_it_says_why(tmp_path, capsys):
    sweep = write_sweep(tmp_path, "smoke", {("plain", "const_1e-3"): [0.1], ("bn", "const_1e-3"): [0.12]})
    rc, out, _ = run(capsys, sweep, "--compare")
    assert rc == 0 and out.rstrip().endswith("run two seeds or more of the cells to compare "
                                             "(--set 'grid.seed=[0, 1]')")
    assert out.splitlines()[-3].rstrip().endswith("one seed: no verdict  ?")
