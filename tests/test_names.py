"""Names that become folders (a sweep's name, a variant's, every trial id) follow one rule, checked
before any work; float settings are finite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vgg_xai.config import NAME_RULE, JobSpec, TrialConfig
from vgg_xai.errors import UserError

BAD_NAMES = {"dotdot": "../../x", "slash": "a/b", "nul": "a\0b", "long": "v" * 300, "dash": "-rf",
             "dot": ".", "inner_dotdot": "a..b", "space": "my sweep", "empty": ""}
SWITCHES = {"bn": True, "dropout": False, "l2": False, "augment": False}


def _spec(results: Path, **over) -> dict:
    d = {"name": "t", "data": {"source": None}, "model": {"width": 0.125},
         "grid": {"variant": ["plain", "bn"], "lr_schedule": ["const_1e-3"]}, "results": str(results)}
    return {**d, **over}


def _as_name(bad: str, results: Path) -> tuple[dict, str]:
    return _spec(results, name=bad), "name"


def _as_variant(bad: str, results: Path) -> tuple[dict, str]:
    return _spec(results, variants={bad: SWITCHES}, grid={"variant": ["plain", bad]}), "variants"


def _as_grid_variant(bad: str, results: Path) -> tuple[dict, str]:
    """A custom variant named only in the grid, its switches set beside it."""
    return _spec(results, grid={"variant": [bad], **SWITCHES}), "variant"


PLACES = {"name": _as_name, "variants": _as_variant, "grid_variant": _as_grid_variant}


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("bad", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_bad_names_are_refused_by_the_spec(bad, place, tmp_path):
    d, key = PLACES[place](bad, tmp_path / "results")
    with pytest.raises(UserError) as e:
        JobSpec.from_dict(d, where="spec.yaml")
    msg = str(e.value)
    assert msg.startswith(f"spec.yaml: {key}: ") and NAME_RULE in msg and len(msg.splitlines()) == 1
    assert len(msg) < 300  # a long name is shortened in the message


@pytest.mark.parametrize("bad,place", [("dotdot", "variants"), ("dotdot", "name"), ("slash", "name"),
                                       ("nul", "variants"), ("long", "name"), ("dash", "variants")])
def test_cli_sweep_dry_run_refuses_bad_names_before_any_work(bad, place, tmp_path):
    results = tmp_path / "results"
    d, key = PLACES[place](BAD_NAMES[bad], results)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(d))  # NUL is written as "\0" in a quoted YAML string
    r = subprocess.run([sys.executable, "-m", "vgg_xai.cli", "sweep", str(spec), "--dry-run"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"vgg-xai: error: {spec}: {key}: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and NAME_RULE in r.stderr
    assert not results.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_good_names_are_kept(tmp_path):
    spec = JobSpec.from_dict(_spec(tmp_path, name="seed-2.v1+bf16", variants={"bn_Dropout-0.3": SWITCHES},
                                   grid={"variant": ["plain", "bn_Dropout-0.3"], "lr_schedule": ["const_1e-3"]}))
    assert spec.name == "seed-2.v1+bf16"
    assert [t for t, _ in spec.trials("/c.h5")] == ["plain-lr1e-3-s0", "bn_Dropout-0.3-lr1e-3-s0"]


def test_grid_values_must_make_a_valid_trial_id(tmp_path):
    """Each name is valid, but the id grows with every varied axis: it must stay a valid name."""
    long = "v" * 110  # + "-lr1e-3-s0-train_size1000": 135 characters
    d = _spec(tmp_path, variants={long: SWITCHES},
              grid={"variant": [long], "lr_schedule": ["const_1e-3"], "train_size": [1000, 2000]})
    with pytest.raises(UserError) as e:
        JobSpec.from_dict(d, where="spec.yaml")
    msg = str(e.value)
    assert msg.startswith("spec.yaml: the trial id made of variant, lr_schedule, seed, train_size: ")
    assert "(135 characters)" in msg and NAME_RULE in msg and len(msg.splitlines()) == 1


def test_train_refuses_a_variant_that_is_not_a_name():
    with pytest.raises(UserError, match=r"^variant: '\.\./x' is not a valid name"):
        TrialConfig(variant="../x", **SWITCHES)


# ---------------------------------------------------------------------------- finite numbers

@pytest.mark.parametrize("key,value", [("width", float("inf")), ("width", float("nan")), ("width", float("-inf")),
                                       ("l2_coef", float("nan")), ("l2_coef", float("inf")),
                                       ("dropout_p", float("nan")), ("dropout_p", float("-inf"))])
def test_trial_floats_must_be_finite(key, value):
    with pytest.raises(UserError) as e:
        TrialConfig.from_dict({key: value})
    assert str(e.value) == f"{key}: must be a finite number, got {value}"


@pytest.mark.parametrize("section,key", [("model", "width"), ("training", "l2_coef"), ("model", "dropout_p")])
@pytest.mark.parametrize("text", [".inf", ".nan", "-.inf"])
def test_spec_yaml_floats_must_be_finite(section, key, text, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: t\n{section}:\n  {key}: {text}\n")
    with pytest.raises(UserError) as e:
        JobSpec.from_yaml(spec)
    assert f": {key}: must be a finite number, got " in str(e.value) and len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("key", ["cpu", "gpu"])
@pytest.mark.parametrize("text", [".inf", ".nan"])
def test_resources_must_be_finite(key, text, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: t\nresources:\n  {key}: {text}\n")
    with pytest.raises(UserError, match=rf"resources\.{key}: expected a finite number >= 0, got (inf|nan)$"):
        JobSpec.from_yaml(spec)
