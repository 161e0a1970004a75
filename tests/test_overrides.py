"""`--set KEY=VALUE` on `sweep` and `submit`: overrides reach the spec that is saved and pickled into
the SLURM job, and are checked by the same rules as the YAML, in one line that names the `--set`."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vgg_xai.cli import _load_spec, build_parser, main
from vgg_xai.config import JobSpec
from vgg_xai.errors import UserError

# A spec without a model section: --set model.width must make one.
SPEC = {"name": "t", "grid": {"variant": ["plain", "bn", "l2"], "lr_schedule": ["const_1e-3"]},
        "training": {"epochs": 2, "batch_size": 32}, "resources": {"cpu": 1}, "retries": 0}


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "results": str(tmp_path / "results")}))
    return path


def test_overrides_reach_the_resolved_spec(spec):
    s = JobSpec.from_yaml(spec, ["training.epochs=1", "grid.variant=[bn,plain]", "resources.gpu=0.25",
                                 "model.width=0.25", "training.l2_coef=1e-3", "training.compile=true",
                                 "training.epochs=3"])  # a later --set of the same key wins
    resolved = s.to_dict()  # what the sweep saves as spec.yaml
    assert resolved["fixed"]["epochs"] == 3 and resolved["fixed"]["width"] == 0.25
    assert resolved["fixed"]["l2_coef"] == 1e-3 and resolved["fixed"]["compile"] is True
    assert resolved["axes"]["variant"] == ["bn", "plain"] and resolved["resources"]["gpu"] == 0.25
    assert [t for t, _ in s.trials("/c.h5")] == ["bn-lr1e-3-s0", "plain-lr1e-3-s0"]
    assert JobSpec.from_yaml(spec).to_dict()["fixed"]["epochs"] == 2  # the file itself is unchanged


def test_a_custom_variant_made_by_set(spec):
    s = JobSpec.from_yaml(spec, ["variants.mine={bn: true, dropout: false, l2: true, augment: false}",
                                 "grid.variant=[mine]", "variants.mine.augment=true"])
    assert s.variants == {"mine": {"bn": True, "dropout": False, "l2": True, "augment": True}}
    assert [(t, c.augment) for t, c in s.trials("/c.h5")] == [("mine-lr1e-3-s0", True)]


def test_submit_pickles_the_overridden_spec_into_the_slurm_job(spec, tmp_path):
    from vgg_xai.slurm import SweepJob

    args = build_parser().parse_args(["submit", str(spec), "--cluster", str(tmp_path / "c.yaml"),
                                      "--set", "training.epochs=1", "--set", "resources.gpu=1"])
    job = pickle.loads(pickle.dumps(SweepJob(_load_spec(args), "/c.h5")))
    assert job.spec.fixed["epochs"] == 1 and job.spec.gpu == 1.0


def test_yaml_numbers_in_the_file_read_as_in_set(tmp_path):
    """PyYAML alone reads 1e-3 as a string; the file and --set read it as a number."""
    path = tmp_path / "spec.yaml"
    path.write_text("name: t\ntraining:\n  l2_coef: 5e-4\n")
    assert JobSpec.from_yaml(path).fixed["l2_coef"] == 5e-4


def _one_line(capsys, argv: list[str]) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vgg-xai: error: "), err
    return lines[0].removeprefix("vgg-xai: error: ")


def test_an_unknown_key_is_the_yamls_error_naming_the_set(spec, tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(yaml.safe_dump({**SPEC, "model": {"widht": 0.25}}))
    from_file = _one_line(capsys, ["sweep", str(bad_yaml), "--dry-run"])
    from_set = _one_line(capsys, ["sweep", str(spec), "--dry-run", "--set", "model.widht=0.25"])
    assert from_file == f"{bad_yaml}: model: unknown key(s) widht; allowed: arch, width, head, init, dropout_p"
    assert from_set == from_file.replace(str(bad_yaml), "--set model.widht=0.25")
    assert _one_line(capsys, ["sweep", str(spec), "--dry-run", "--set", "training.epochs=1", "--set", "sede=1"]) \
        .startswith("--set sede=1: unknown key(s) sede; allowed: name, data, model")


@pytest.mark.parametrize("overrides,message", [
    (["training.epochs=0"], "--set training.epochs=0: epochs: must be in [1, 100000], got 0"),
    (["training.epochs=1", "resources.gpu=lots"], "--set resources.gpu=lots: resources.gpu: expected a finite number"),
    (["grid.variant=[bn, nope]"], "--set grid.variant=[bn, nope]: variant: 'nope' is not a preset"),
    (["name=../x"], "--set name=../x: name: '../x' is not a valid name"),
    (["name.x=1"], "--set name.x=1: name is 't', not a mapping of keys; set name=VALUE to replace it"),
    (["training.epochs"], "--set 'training.epochs': no '='; write KEY=VALUE, e.g. --set training.epochs=1"),
    (["=1"], "--set '=1': the key before '=' is empty; write KEY=VALUE"),
    (["training..epochs=1"], "--set 'training..epochs=1': the key 'training..epochs' has an empty part"),
    (["grid.variant=[bn,plain"], "--set 'grid.variant=[bn,plain': the value is not valid YAML (expected ',' or ']'"),
    (["training.epochs=1", "training.batch_size=500", "data.train_size=100"],  # neither alone is wrong
     "--set training.batch_size=500 --set data.train_size=100: batch_size: 500 is more than the 100"),
])
def test_bad_overrides_are_one_line_and_write_nothing(overrides, message, spec, tmp_path, capsys):
    argv = ["sweep", str(spec), "--dry-run"] + [a for o in overrides for a in ("--set", o)]
    assert _one_line(capsys, argv).startswith(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_the_blame_falls_on_the_file_when_it_is_wrong_itself(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "retries": -1}))
    with pytest.raises(UserError) as e:
        JobSpec.from_yaml(path, ["training.epochs=1"])
    assert str(e.value) == f"{path} with --set training.epochs=1: retries: expected a whole number >= 0, got -1"


def test_dry_run_lists_the_overridden_trials(spec, tmp_path):
    r = subprocess.run([sys.executable, "-m", "vgg_xai.cli", "sweep", str(spec), "--dry-run",
                        "--set", "grid.variant=[bn,plain]", "--set", "training.epochs=1", "--set", "name=t-short"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("sweep t-short: 2 trials, 1 CPU and 0 GPU each")
    assert [x.split()[0] for x in lines[3:]] == ["bn-lr1e-3-s0", "plain-lr1e-3-s0"]
    assert all(x.endswith("epochs 1  [to run]") for x in lines[3:])
    assert not (tmp_path / "results").exists()


def test_a_grid_of_40000_trials_plans_and_a_repeated_value_is_refused(spec):
    """Planning counts trial ids once (it was quadratic: 120 s for 40,000 trials); a repeated value
    gives the same trial twice and is one line."""
    seeds = "[" + ", ".join(map(str, range(13_334))) + "]"
    assert len(JobSpec.from_yaml(spec, [f"grid.seed={seeds}"]).trials("/c.h5")) == 3 * 13_334
    with pytest.raises(UserError, match=r"grid.seed=\[0, 1, 1\]: the grid repeats trials \(bn-lr1e-3-s1, l2-lr1e-3-s1"):
        JobSpec.from_yaml(spec, ["grid.seed=[0, 1, 1]"])


BOMB = "[&a [x, x, x, x, x, x, x, x, x], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a], &c [*b, *b, *b, *b, *b, *b, *b, *b, *b], " \
       "&d [*c, *c, *c, *c, *c, *c, *c, *c, *c], &e [*d, *d, *d, *d, *d, *d, *d, *d, *d], " \
       "&f [*e, *e, *e, *e, *e, *e, *e, *e, *e], &g [*f, *f, *f, *f, *f, *f, *f, *f, *f], " \
       "&h [*g, *g, *g, *g, *g, *g, *g, *g, *g], &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]]"


def test_an_alias_bomb_is_one_line_before_it_is_built(spec, tmp_path, capsys):
    """9^9 values through nine anchors: counted on the composed graph and refused, in a --set value
    and in a spec file, without building it (it would fill the memory)."""
    rc = main(["sweep", str(spec), "--dry-run", "--set", f"grid.seed={BOMB}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "--set grid.seed: the YAML expands to more than 100,000 values through its aliases" in err
    bombed = tmp_path / "bomb.yaml"
    bombed.write_text(spec.read_text() + f"variants: {{mine: {BOMB}}}\n")
    rc = main(["sweep", str(bombed), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bombed}: the YAML expands to more than 100,000 values" in err
    # an alias of a few values is fine
    ok = tmp_path / "ok.yaml"
    ok.write_text(spec.read_text() + "variants: {mine: &s {bn: true, dropout: false, l2: false, augment: false}, "
                                     "yours: *s}\n")
    assert JobSpec.from_yaml(ok).variants["yours"] == JobSpec.from_yaml(ok).variants["mine"]
