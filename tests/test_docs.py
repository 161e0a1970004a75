"""What the README and docs/reference.md promise a reader, checked against the code: the first
screen in the order it is run, the studies named before they are used, and the documented columns
of the results CSV as the code writes them. (test_readme.py runs every command they show.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from test_readme import readme_commands

from vgg_xai.results import collect_rows, pivot, pivot_csv

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
REFERENCE = (REPO / "docs" / "reference.md").read_text()


def test_the_first_steps_come_in_the_order_they_are_run():
    """torch's CPU build before the project (after it, pip would already have pulled the CUDA build),
    then the smoke study, each once, before anything else the README shows."""
    assert readme_commands()[:3] == ["pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu",
                                     'pip install -e ".[dev]"',
                                     "vgg-xai sweep jobs/smoke.yaml --data PATH/TO/cifar10"]
    first_screen = README[:README.index("\n## ", README.index("## From a clone"))]
    assert first_screen.count("```bash") == 1 and "results/smoke/report.html" in first_screen
    # the smoke study's measured time says on what machine, and under what load
    assert re.search(r"On 2 CPU cores \([^)]+\) the command above took \d+ min \d+ s end to end, measured while",
                     " ".join(first_screen.split())), first_screen


def test_the_seed_study_is_named_once_before_it_is_used():
    first = README.index("seed study")
    assert README[first - len("**the "):first + len("seed study**")] == "**the seed study**"
    definition = README[first:README.index("\n\n", first)]
    assert "jobs/seed.yaml" in definition and "measured with this project" in definition
    assert "seed study" not in README[:first] and "the seed's" not in REFERENCE


def test_the_documented_csv_columns_are_the_ones_written(tmp_path):
    written = pivot_csv(pivot(collect_rows(tmp_path))).splitlines()[0]
    assert written.startswith("variant,schedule,metric,") and "interpretation_failed" in written
    documented = re.findall(r"`(variant,schedule,metric[a-z_,]*)`", README + REFERENCE)
    assert documented == [written]
    # and the results command's own help (which wraps the long word where it likes)
    r = subprocess.run([sys.executable, "-m", "vgg_xai.cli", "results", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and f"csv(longform:{written})" in "".join(r.stdout.split()), r.stdout
