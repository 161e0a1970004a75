"""Every command the README and the reference (docs/*.md) show, run as written, in their order, as a
user runs them.

The README and docs/*.md are a test: a command that is added, changed or removed there without being
walked here fails `test_every_readme_command_is_walked`. Placeholders are filled in as a user would:
PATH (and PATH/TO/cifar10) is the real CIFAR-10 archive, HOST:/scratch/me/ is this machine's
walk-through folder reached over a stand-in ssh (no network). Commands run in a fresh folder
holding the repo's jobs/ and cluster/ (so results/ is the test's own), but `pip install`, which
installs a checkout, runs in the checkout. Where this machine cannot do what a command is for
(the seed study needs GPUs, the example cluster profile a GPU partition), the command still runs
as written and must fail in one clear line, before anything is submitted.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAKE_SSH, SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def readme_commands() -> list[str]:
    """The command lines of the ```bash blocks of the README, then of docs/*.md, comments stripped, in order."""
    blocks = [b for doc in DOCS for b in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S)]
    lines = []
    for block in blocks:
        for line in block.splitlines():
            cmd = line.split("  #")[0].strip()
            if cmd and not cmd.startswith("#"):
                lines.append(cmd)
    return lines


# How each README command is expected to end on a CPU-only machine like CI's: 0, or exit 2 and the
# one line that says why this machine cannot do what the command is for.
REFUSED_HERE = {
    "vgg-xai sweep jobs/seed.yaml": "per trial, but this machine has",
    "vgg-xai sweep jobs/seed.yaml --address auto": "resources.cpu: 4 per trial, but the Ray cluster has 2 CPUs",
    "vgg-xai submit jobs/seed.yaml --cluster cluster/example-gpu.yaml":
        "partition: 'gpu' does not exist on this cluster",
    "vgg-xai status results/seed": "results/seed: not a sweep folder (no trials/)",
    "vgg-xai cancel results/seed": "no SLURM jobs recorded",
    "vgg-xai sweep jobs/smoke.yaml --data PATH --set name=smoke-gpu --set resources.gpu=0.25 "
    "--set training.device=cuda": "vgg-xai: error: resources.gpu: 0.25 per trial, but this machine has 0 GPUs; "
                                  "set resources.gpu: 0 or run where there are GPUs",
}
# README commands this module does not run, and why; each is reported as a skip with its reason.
# The README's seed-to-seed spread of the CPU study: two of its cells over five seeds.
SEEDS = "vgg-xai sweep jobs/cpu-seeds.yaml --data PATH/TO/cifar10"
NOT_RUN_HERE = {
    "vgg-xai sweep jobs/cpu.yaml --data PATH/TO/cifar10":
        "the CPU study trains 15 trials on 40,000 images (about 25 minutes on 2 cores); "
        "test_the_cpu_study_plans checks its spec, and the smoke study runs the same code",
    SEEDS: "it grows the CPU study by 8 trials (about 12 minutes on 2 cores) after the CPU study itself; "
           "test_the_cpu_study_plans checks what it plans, test_grow.py grows sweeps the same way",
    "vgg-xai results results/cpu --compare":
        "it reads the grown CPU study above (about 35 minutes of training on 2 cores); test_compare.py compares "
        "the cells of a sweep the same way",
    "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu":
        "it downloads torch's CPU build from download.pytorch.org (tests talk only to 127.0.0.1) and would "
        "replace this environment's torch",
    'python -m pytest -m "not slow"':
        "it is this suite's fast tier (every test not marked slow), which the suite as a whole runs; here it "
        "would recurse",
}
# The README's test command is this suite itself: CI runs it as written (.ci/run); here it would recurse.
SUITE = "python -m pytest"


def test_every_readme_command_is_walked():
    walked = set(WALK) | set(REFUSED_HERE) | set(NOT_RUN_HERE) | {SUITE}
    assert set(readme_commands()) <= walked, set(readme_commands()) - walked
    assert set(WALK) <= set(readme_commands()), set(WALK) - set(readme_commands())
    assert any(line.strip() == SUITE for line in (REPO / ".ci" / "run").read_text().splitlines())
    assert any(line.strip().startswith('python -m pip install --progress-bar off -e ".[dev]"')
               for line in (REPO / ".ci" / "run").read_text().splitlines())


class Shell:
    """Runs command lines one at a time in bash, carrying exported variables (eval "$(... start)")
    from one line to the next, as one terminal would."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.cwd, self.env = cwd, dict(env)

    def run(self, line: str, timeout: float = 1800, cwd: Path | None = None) -> subprocess.CompletedProcess:
        envfile = self.cwd / ".env-after"
        script = f"{line}\nrc=$?\nenv -0 > {shlex.quote(str(envfile))}\nexit $rc\n"
        r = subprocess.run(["bash", "-c", script], cwd=cwd or self.cwd, env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if envfile.is_file():
            self.env = dict(x.split("=", 1) for x in envfile.read_text().split("\0") if "=" in x)
            envfile.unlink()
        return r


def _fill(line: str, work: Path) -> str:
    line = line.replace("PATH/TO/cifar10", str(SHARED_DATA)).replace("--data PATH", f"--data {SHARED_DATA}")
    return line.replace("HOST:/scratch/me/", f"localhost:{work}/")


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    # Nothing of Ray's (no notice about token authentication when the command joins a cluster).
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("vgg-xai: error: "), r.stderr
    return lines[0]


def _wait_for_jobs(shell: Shell, sweep: Path, timeout: float = 1800) -> dict[str, str]:
    import json

    ids = [j["job_id"] for j in json.loads((sweep / "slurm" / "jobs.json").read_text())[-1]["jobs"]]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)], env=shell.env,
                             capture_output=True, text=True).stdout
        states = {line.split("|")[0]: line.split("|")[1].split()[0] for line in out.splitlines() if "|" in line}
        if len(states) == len(ids) and set(states.values()) <= FINAL:
            return states
        time.sleep(2)
    raise AssertionError(f"jobs {ids} did not end")


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    if not SHARED_DATA.is_file():
        pytest.skip(reason=f"the real CIFAR-10 the README's PATH stands for is missing here ({SHARED_DATA})")
    work = tmp_path_factory.mktemp("readme")
    for name in ("jobs", "cluster"):
        (work / name).symlink_to(REPO / name)
    (work / "fake_ssh.py").write_text(FAKE_SSH)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "RSYNC_RSH": f"{sys.executable} {work / 'fake_ssh.py'}"}
    return Shell(work, env)


def _walk_line(walk: Shell, line: str, **kw) -> subprocess.CompletedProcess:
    cwd = REPO if line.startswith("pip install") else None
    r = walk.run(_fill(line, walk.cwd), cwd=cwd, **kw)
    if line in REFUSED_HERE:
        assert r.returncode == 2, (line, r.stdout, r.stderr)
        assert REFUSED_HERE[line] in _one_error_line(r), r.stderr
    else:
        assert r.returncode == 0, (line, r.stdout[-3000:], r.stderr[-3000:])
    return r


# The commands of the README and docs/*.md this module runs to success, in their order (the lines in
# REFUSED_HERE are walked in their places too).
WALK = [
    'pip install -e ".[dev]"',
    "vgg-xai sweep jobs/smoke.yaml --data PATH/TO/cifar10",
    "vgg-xai sweep jobs/smoke.yaml --data PATH",
    "vgg-xai sweep jobs/seed.yaml --dry-run",
    "vgg-xai sweep jobs/smoke.yaml --dry-run --set name=smoke-1epoch --set training.epochs=1 "
    "--set 'grid.variant=[bn,plain]'",
    "vgg-xai status results/smoke --watch",
    "vgg-xai logs results/smoke bn-lr1e-3-s0",
    "vgg-xai postprocess results/smoke",
    "vgg-xai postprocess results/smoke --workers 1",
    "vgg-xai results results/smoke",
    "vgg-xai results results/smoke --format latex --metric ari",
    "vgg-xai results results/smoke --sort test_acc --top 5",
    "vgg-xai results results/smoke --compare",
    "vgg-xai results pull HOST:/scratch/me/results/smoke ./pulled/smoke",
    "cluster/local-slurm/local-slurm install",
    'eval "$(cluster/local-slurm/local-slurm start --gpus 2)"',
    "vgg-xai submit jobs/smoke.yaml --cluster cluster/local.yaml --data PATH",
    "vgg-xai status results/smoke",
    "cluster/local-slurm/local-slurm stop",
    'eval "$(cluster/local-slurm/local-slurm start --nodes 3)"',
    "vgg-xai submit jobs/smoke.yaml --cluster cluster/local-multi.yaml --data PATH",
    "cluster/local-slurm/local-slurm stop --purge",
]


@pytest.mark.slow
def test_set_up_and_the_smoke_study(walk):
    _walk_line(walk, 'pip install -e ".[dev]"', timeout=900)
    r = _walk_line(walk, "vgg-xai sweep jobs/smoke.yaml --data PATH/TO/cifar10")
    sweep = walk.cwd / "results" / "smoke"
    assert "15 trials to run" in r.stdout and (sweep / "report.html").is_file()
    assert len(list(sweep.glob("trials/*/result.json"))) == 15
    # the same command again, as the Sweeps section shows it: nothing left to run
    r = _walk_line(walk, "vgg-xai sweep jobs/smoke.yaml --data PATH")
    assert "0 trials to run, 15 finished earlier" in r.stdout


@pytest.mark.slow
def test_sweeps_of_the_seed_study(walk, tmp_path):
    from vgg_xai.runtime import free_port, start_head

    _walk_line(walk, "vgg-xai sweep jobs/seed.yaml")
    # a running Ray cluster to join: a head on a loopback address of its own, found through RAY_ADDRESS
    token = tmp_path / "token"
    temp_dir = f"/tmp/vgg-xai-readme-{free_port('127.0.0.1')}"  # short: Ray's socket paths
    head = start_head("127.0.0.5", 2, 0, tmp_path / "head.log", token=token, temp_dir=temp_dir)
    try:
        walk.env.update(RAY_ADDRESS=head.address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
        _walk_line(walk, "vgg-xai sweep jobs/seed.yaml --address auto", timeout=300)
    finally:
        for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
            walk.env.pop(k, None)
        head.stop()
        subprocess.run(["rm", "-rf", temp_dir])
    r = _walk_line(walk, "vgg-xai sweep jobs/seed.yaml --dry-run")
    assert "sweep seed: 15 trials" in r.stdout and r.stdout.count("[to run]") == 15


@pytest.mark.parametrize("line", list(NOT_RUN_HERE))
def test_not_run_here(line):
    pytest.skip(reason=f"not run here: `{line}`: {NOT_RUN_HERE[line]}")


@pytest.mark.slow
def test_the_cpu_study_plans(walk):
    """jobs/cpu.yaml as the README describes it: the seed study's 15 trials on the full training split."""
    r = walk.run(f"vgg-xai sweep jobs/cpu.yaml --dry-run --data {SHARED_DATA}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sweep cpu: 15 trials, 1 CPU and 0 GPU each"), r.stdout
    assert r.stdout.count("vgg11_cifar width 0.125 mlp epochs 3  [to run]") == 15, r.stdout
    from vgg_xai.config import JobSpec

    spec = JobSpec.from_yaml(REPO / "jobs" / "cpu.yaml")
    assert spec.data.get("train_size") is None  # the full 40,000-image training split
    r = walk.run(SEEDS.replace("PATH/TO/cifar10", str(SHARED_DATA)) + " --dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sweep cpu: 23 trials, 1 CPU and 0 GPU each"), r.stdout  # the same sweep, grown
    trials = [x.split()[0] for x in r.stdout.splitlines() if x.endswith("[to run]")]
    assert trials[15:] == [f"{v}-lr1e-3-s{k}" for v in ("plain", "bn") for k in range(1, 5)], r.stdout
    assert r.stdout.count("vgg11_cifar width 0.125 mlp epochs 3  [to run]") == 23, r.stdout
    cpu = {t for t, _ in spec.trials("x")}
    assert cpu <= {t for t, _ in JobSpec.from_yaml(REPO / "jobs" / "cpu-seeds.yaml").trials("x")}  # all kept


@pytest.mark.slow
def test_overrides_with_set(walk):
    r = _walk_line(walk, "vgg-xai sweep jobs/smoke.yaml --dry-run --set name=smoke-1epoch --set training.epochs=1 "
                         "--set 'grid.variant=[bn,plain]'")
    trials = [x.split()[0] for x in r.stdout.splitlines() if x.endswith("[to run]")]
    assert r.stdout.startswith("sweep smoke-1epoch: 6 trials, 1 CPU and 0 GPU each"), r.stdout
    assert trials == [f"{v}-{s}-s0" for v in ("bn", "plain") for s in ("lr1e-3", "lr1e-2", "lralt")], r.stdout
    assert r.stdout.count(" epochs 1  [to run]") == 6 and not (walk.cwd / "results" / "smoke-1epoch").exists()
    _walk_line(walk, "vgg-xai sweep jobs/smoke.yaml --data PATH --set name=smoke-gpu --set resources.gpu=0.25 "
                     "--set training.device=cuda")
    assert not (walk.cwd / "results" / "smoke-gpu").exists()


@pytest.mark.slow
def test_following_a_finished_sweep(walk):
    for line in ("vgg-xai status results/smoke", "vgg-xai status results/smoke --watch"):
        r = _walk_line(walk, line, timeout=120)  # --watch: nothing runs the sweep, so one view and out
        assert r.stdout.startswith("sweep smoke: 15/15 done, 0 running, 0 pending, 0 failed · no driver running")
        rows = [x for x in r.stdout.splitlines()[2:] if x.strip()]
        assert r.stdout.count("sweep smoke:") == 1 and len(rows) == 16 and rows[0].startswith("trial "), r.stdout
    r = _walk_line(walk, "vgg-xai logs results/smoke bn-lr1e-3-s0")
    assert r.stdout.startswith("==> trial.log: ") and "=== attempt 1 on " in r.stdout, r.stdout
    assert "epoch   2  lr 1e-03" in r.stdout and "result: completed" in r.stdout, r.stdout


@pytest.mark.slow
def test_postprocessing_and_results(walk):
    sweep = walk.cwd / "results" / "smoke"
    for line in ("vgg-xai postprocess results/smoke", "vgg-xai postprocess results/smoke --workers 1"):
        r = _walk_line(walk, line)
        assert "interpreted 0 trials, 15 up to date" in r.stdout
    r = _walk_line(walk, "vgg-xai results results/smoke")
    assert "bn_augment" in r.stdout and "const_1e-2" in r.stdout
    r = _walk_line(walk, "vgg-xai results results/smoke --format latex --metric ari")
    assert r.stdout.startswith("\\begin{tabular}") or "\\begin{tabular}" in r.stdout
    r = _walk_line(walk, "vgg-xai results results/smoke --sort test_acc --top 5")
    head, rows = r.stdout.split("\n\n", 1)
    assert head == "trials by test_acc, best first (higher is better; no value last): 5 of 15", r.stdout
    table = rows.splitlines()
    column = table[0].split().index("test_acc")
    accs = [float(x.split()[column]) for x in table[2:]]
    assert len(accs) == 5 and accs == sorted(accs, reverse=True), r.stdout
    r = _walk_line(walk, "vgg-xai results results/smoke --compare")
    assert r.stdout.startswith("test_acc: differences between cells over seeds (higher is better)"), r.stdout
    # one seed a cell: every row says so, and none gives a verdict it cannot have
    assert "one seed: no verdict" in r.stdout and "beyond seed noise" not in r.stdout.split("\n\n", 1)[1]
    _walk_line(walk, "vgg-xai results pull HOST:/scratch/me/results/smoke ./pulled/smoke")
    pulled = walk.cwd / "pulled" / "smoke"
    assert (pulled / "report.html").is_file() and len(list(pulled.glob("trials/*/result.json"))) == 15
    assert not list(pulled.rglob("*.pt")) and not list(pulled.rglob("*.h5"))
    assert (sweep / "tables" / "accuracy.csv").read_text() == (pulled / "tables" / "accuracy.csv").read_text()


def _local_slurm_shell(walk, tmp_path) -> tuple[Shell, Path]:
    """A shell in a fresh folder (the study is trained through SLURM) whose local SLURM lives in a run folder
    of its own, so that its `stop` stops only the one it started; skips where not root."""
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        pytest.skip(reason="the local SLURM needs root (cluster/local-slurm/local-slurm)")
    run_dir = Path(tempfile_dir())
    walk.env["VGG_XAI_SLURM_DIR"] = str(run_dir)
    walk.env.pop("SLURM_CONF", None)
    local = Shell(tmp_path, walk.env)
    for name in ("jobs", "cluster", "fake_ssh.py"):
        (tmp_path / name).symlink_to(walk.cwd / name)
    return local, run_dir


def _submit_the_smoke_study(local: Shell, profile: str) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's submit of the smoke study with ``profile``, waited for: both jobs completed, every trial
    done, the tables and the report written; returns the sweep folder and `vgg-xai status` of it."""
    r = _walk_line(local, f"vgg-xai submit jobs/smoke.yaml --cluster {profile} --data PATH")
    assert re.search(r"^sweep\s+\d+", r.stdout, re.M) and re.search(r"^postprocess\s+\d+", r.stdout, re.M)
    sweep = local.cwd / "results" / "smoke"
    states = _wait_for_jobs(local, sweep)
    assert set(states.values()) == {"COMPLETED"}, _walk_line(local, "vgg-xai status results/smoke").stdout
    r = _walk_line(local, "vgg-xai status results/smoke")
    assert r.stdout.startswith("sweep smoke: 15/15 done, 0 running, 0 pending, 0 failed · "
                               "no SLURM job of this sweep is queued"), r.stdout
    assert (sweep / "tables" / "accuracy.csv").is_file() and (sweep / "report.html").is_file()
    return sweep, r


@pytest.mark.slow
def test_slurm_on_a_cluster_and_on_the_local_one(walk, tmp_path):
    local, run_dir = _local_slurm_shell(walk, tmp_path)
    try:
        _walk_line(local, "cluster/local-slurm/local-slurm install", timeout=900)
        _walk_line(local, 'eval "$(cluster/local-slurm/local-slurm start --gpus 2)"', timeout=300)
        assert local.env["SLURM_CONF"].startswith(str(run_dir))
        # the cluster profile of the example: this cluster has no GPU partition, and says so
        _walk_line(local, "vgg-xai submit jobs/seed.yaml --cluster cluster/example-gpu.yaml")
        _walk_line(local, "vgg-xai status results/seed")
        _walk_line(local, "vgg-xai cancel results/seed")
        _, r = _submit_the_smoke_study(local, "cluster/local.yaml")
        assert r.stdout.count("COMPLETED") == 2 and r.stdout.count(" completed: test ") == 15, r.stdout
    finally:
        _walk_line(local, "cluster/local-slurm/local-slurm stop", timeout=300)
        subprocess.run(["rm", "-rf", str(run_dir)])


@pytest.mark.slow
def test_slurm_across_nodes(walk, tmp_path):
    """The README's multi-node block: the smoke study on two nodes of a local 3-node SLURM."""
    local, run_dir = _local_slurm_shell(walk, tmp_path)
    try:
        _walk_line(local, 'eval "$(cluster/local-slurm/local-slurm start --nodes 3)"', timeout=300)
        assert local.env["SLURM_CONF"].startswith(str(run_dir))
        nodes = {line.split()[0]: line.split()[2] for line in (run_dir / "nodes").read_text().splitlines()}
        subnet = (run_dir / "net").read_text().split()[1]
        # the nodes' addresses bypass the (closed) proxy, as loopback does
        local.env["no_proxy"] = local.env["NO_PROXY"] = ",".join(
            [local.env.get("no_proxy", "127.0.0.1,localhost"), f"{subnet}.1", *nodes.values()])
        _, r = _submit_the_smoke_study(local, "cluster/local-multi.yaml")
        # one sweep job on two nodes, and both trained trials; status names the node of each
        ran_on = {line.rsplit(" on ", 1)[1] for line in r.stdout.splitlines() if " completed: test " in line}
        assert len(ran_on) == 2 and ran_on <= set(nodes), r.stdout
    finally:
        _walk_line(local, "cluster/local-slurm/local-slurm stop --purge", timeout=300)
        assert not run_dir.exists()


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="vgg-xai-readme-slurm-", dir="/tmp")  # short: munge's socket path
