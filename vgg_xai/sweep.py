"""A sweep: a job spec's grid planned into trial folders, then run as Ray Tune trials.

Trial folders are ours and stable (``results/<sweep>/trials/<trial_id>/``); Ray keeps its own
state under ``results/<sweep>/ray/``. A trial resumes from the checkpoint.pt in its folder, so
a retry after a crash, a rerun after the driver was stopped and a SLURM requeue all continue
where the trial stopped. A finished trial (result.json) is never run again, and a sweep grows: when
its spec changes, every trial whose settings are unchanged is kept, new trials are added, and a
finished trial given more epochs continues from its last checkpoint (`Growth`). Ray itself is
vgg_xai.runtime's; the live view is vgg_xai.monitor's; post-processing follows a sweep in the
command that runs it.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import runtime
from .atomic import atomic_write_text
from .config import JobSpec, TrialConfig
from .errors import DiskFull, UserError
from .trial_folder import CHECKPOINT, CONFIG, ERROR, FINISHED, RESULT, Damaged, finished, read_config, read_result
from .trial_folder import write_config, write_error

# Settings whose change continues a trial from its checkpoint instead of training it anew.
CONTINUABLE = ("epochs", "stop_dead")


@dataclass
class Growth:
    """How a sweep's grid compares with the trial folders it already holds, by each trial's settings."""
    kept: list[str] = field(default_factory=list)  # finished, nothing to add
    new: list[str] = field(default_factory=list)  # no folder yet
    continued: list[str] = field(default_factory=list)  # started or planned earlier, not finished
    longer: list[str] = field(default_factory=list)  # finished, now with more epochs: on from its last checkpoint
    retrained: list[str] = field(default_factory=list)  # the same id with other settings: trained anew
    outside: list[str] = field(default_factory=list)  # on disk, no longer in the spec: kept, left out of tables
    why: dict[str, str] = field(default_factory=dict)  # trial -> what changed in its settings
    started: set[str] = field(default_factory=set)  # of the continued: those with a checkpoint

    def line(self) -> str:
        """What the change does, in one line: ``+8 new trials, 15 kept, 0 retrained``."""
        parts = [f"+{len(self.new)} new trials", f"{len(self.kept)} kept", f"{len(self.retrained)} retrained"]
        if self.continued:
            parts.append(f"{len(self.continued)} continued")
        if self.longer:
            parts.append(f"{len(self.longer)} continued to more epochs")
        if self.outside:
            parts.append(f"{len(self.outside)} outside the spec (kept on disk, left out of the tables)")
        return ", ".join(parts)

    def label(self, tid: str) -> str:
        """The trial's part in the plan, as --dry-run shows it."""
        if tid in self.kept:
            return "finished"
        if tid in self.new or tid in self.continued:
            return "to continue" if tid in self.started else "to run"
        if tid in self.longer:
            return f"continue to more epochs: {self.why[tid]}"
        return f"train anew: {self.why[tid]}"


@dataclass
class Plan:
    spec: JobSpec
    sweep_dir: Path
    data: Path
    trials: list[tuple[str, TrialConfig]]  # every trial of the grid
    changes: list[str] = field(default_factory=list)  # a change of the sweep's data: nothing can be kept
    warnings: list[str] = field(default_factory=list)  # what this machine could not run (dry run only)
    growth: Growth = field(default_factory=Growth)

    def trial_dir(self, trial_id: str) -> Path:
        return self.sweep_dir / "trials" / trial_id

    def pending(self) -> list[tuple[str, TrialConfig]]:
        return [(t, c) for t, c in self.trials if not finished(self.trial_dir(t))]


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _identity(resolved: dict[str, Any]) -> dict[str, Any]:
    """What must stay the same for any trial of a sweep to be kept: its data, by content digest.

    The path or archive that named the data is not part of it: the same images prepared from an
    archive on a laptop and handed to a SLURM job as the prepared .h5 are the same sweep. A digest
    not known (a dry run before the data was prepared, a sweep started by an older version) is not
    compared. The rest of the spec is compared trial by trial (`grow`).
    """
    data = {k: v for k, v in resolved["data"].items() if k not in ("source", "cache")}
    if data.get("content_sha256") is None:
        data.pop("content_sha256", None)
    return {"data": data}


def grow(sweep_dir: Path, trials: list[tuple[str, TrialConfig]]) -> Growth:
    """Sort the grid's trials by what the folders already in ``sweep_dir`` hold (see Growth). A
    trial whose settings differ only in CONTINUABLE ones continues: a finished one to more epochs
    (or, stopped as collapsed, to the end with stop_dead off); fewer epochs than it trained, or any
    other setting, trains it anew."""
    g = Growth()
    folders = Path(sweep_dir, "trials")
    listed = {t for t, _ in trials}
    g.outside = sorted(d.name for d in folders.iterdir() if d.is_dir() and d.name not in listed) \
        if folders.is_dir() else []
    for tid, cfg in trials:
        d = folders / tid
        try:
            old = read_config(d) if d.is_dir() else None
            result = read_result(d) if old is not None else None
        except Damaged:  # a record that does not read is written anew: the trial continues from its checkpoint
            old, result = {}, None
        if old is None:
            g.new.append(tid)
            continue
        diff = cfg.changes_from(old)  # not the data path: the sweep's data is compared by content
        if diff:
            g.why[tid] = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        if (d / CHECKPOINT).is_file():
            g.started.add(tid)
        if not diff:
            (g.kept if result is not None else g.continued).append(tid)
        elif set(diff) - set(CONTINUABLE) or cfg.epochs < old.get("epochs", cfg.epochs):
            g.retrained.append(tid)
        elif result is None:
            g.continued.append(tid)
        elif (result["status"] == "completed" and cfg.epochs > old.get("epochs", cfg.epochs)) or \
                (result["status"] == "collapsed" and not cfg.stop_dead):
            g.longer.append(tid)
        else:  # more epochs for a diverged trial, stop_dead for one that never collapsed: nothing to train
            g.kept.append(tid)
    return g


def _apply(p: Plan) -> None:
    """Make the folders what the growth says: a trial trained anew has its old folder set aside in
    ``replaced/`` (nothing is deleted), one continued to more epochs loses its result (so it runs)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for tid in p.growth.retrained:
        aside = p.sweep_dir / "replaced" / f"{tid}.{stamp}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(p.trial_dir(tid)), aside)
    for tid in p.growth.longer:
        (p.trial_dir(tid) / RESULT).unlink(missing_ok=True)


def sweep_dir_of(spec: JobSpec) -> Path:
    return Path(spec.results).absolute() / spec.name


def check_inputs(spec: JobSpec, *, data: str | Path | None = None, check_local: bool = True,
                 dry_run: bool = False, address: str | None = None) -> tuple[Path | None, Path, list[str]]:
    """Every check of a sweep's input that needs no writing: (data source or None, cache, what this
    machine lacks). Bad input raises UserError; what the machine lacks (``check_local``: the
    resources and device a trial asks for) raises too, unless ``dry_run``. An ``address`` must
    answer."""
    from .config import DEFAULT_CACHE
    from .data import source_kind

    from .train import check_install

    check_install()  # a broken install stops here, before Ray starts and not after the last epoch
    if address:
        runtime.check_address(address)
    results = Path(spec.results)
    if results.exists() and not results.is_dir():
        raise UserError(f"results: {results} is a file; name a folder for the sweep's results (--results)")

    lacking = _machine_problems(spec) if check_local else []
    if lacking and not dry_run:
        raise UserError(lacking[0])
    source = data if data is not None else spec.data.get("source")
    key = "--data" if data is not None else "data.source"
    cache = Path(spec.data.get("cache") or Path(spec.results, DEFAULT_CACHE.relative_to("results"))).absolute()
    if source is None:
        return None, cache, lacking
    if Path(source).suffix in (".h5", ".hdf5"):
        if not Path(source).is_file():
            raise UserError(f"{key}: {source}: no such file or folder; pass a prepared cache (.h5) or a CIFAR-10 "
                            "source")
        _check_subsets(spec, Path(source))
        return None, Path(source).absolute(), lacking
    try:
        source_kind(Path(source))
    except UserError as e:
        raise UserError(f"{key}: {e}") from None
    return Path(source), cache, lacking


def _check_subsets(spec: JobSpec, cache: Path) -> None:
    """Every trial's subsets against what the prepared cache holds, before any trial starts."""
    from .data import check_subsets, split_sizes

    sizes = split_sizes(cache)
    for _, c in spec.trials(""):
        check_subsets({"train": c.train_size, "valid": c.valid_size, "test": c.test_size}, sizes, cache)


def plan(spec: JobSpec, *, data: str | Path | None = None, force_new: bool = False, dry_run: bool = False,
         check_local: bool = True) -> Plan:
    """Resolve data and folders, check the spec against an earlier run of the same sweep.

    Nothing is trained here, and every check a user's input can fail happens here, before Ray
    starts. The driver prepares the data cache once (trials read it by absolute path) and checks
    its content against the digest stored when it was prepared. With ``check_local`` the resources
    and device a trial asks for are checked against this machine (else against the Ray cluster,
    once joined). Hold ``locks.driving(sweep_dir_of(spec))`` around it when it is not a dry run.

    ``dry_run``: prepare nothing and write nothing; what a real run would refuse is in
    ``changes``, and what this machine could not run is in ``warnings`` instead of an error.
    """
    from .data import cached_identity, prepare, verify_cache

    source, cache, warnings = check_inputs(spec, data=data, check_local=check_local, dry_run=dry_run)
    sweep_dir = sweep_dir_of(spec)
    if dry_run:
        digest = cached_identity(source, cache)
    else:
        if source is not None or not cache.is_file():
            cache = prepare(source, cache, split_seed=int(spec.data.get("split_seed", 0)))
        digest = verify_cache(cache)
    if digest is not None:
        _check_subsets(spec, cache)
    resolved = {**spec.to_dict(), "data": {**spec.data, "source": str(source) if source else None,
                                           "cache": str(cache), "content_sha256": digest}}
    saved = sweep_dir / "spec.yaml"
    trials = spec.trials(str(cache))
    changes = _diff(_identity(yaml.safe_load(saved.read_text())), _identity(resolved)) if saved.is_file() else []
    growth = grow(sweep_dir, trials)
    kept = growth.kept + growth.continued + growth.longer
    if not changes and growth.retrained and not kept:
        changes = [f"every trial's settings changed ({growth.why[growth.retrained[0]]}): nothing would be kept"]
    if changes and not dry_run:
        if not force_new:
            raise UserError(f"{sweep_dir}: the spec changed since this sweep started ({'; '.join(changes[:4])}); "
                            "run it under another name, or pass --force-new to start over (the old folder is kept)")
        aside = sweep_dir.with_name(f"{sweep_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(sweep_dir), aside)
        print(f"started over: the earlier sweep was moved to {aside}", file=sys.stderr)
        growth = grow(sweep_dir, trials)
    elif saved.is_file() and not dry_run:
        print(f"sweep {spec.name}: {growth.line()}", file=sys.stderr, flush=True)
    p = Plan(spec, sweep_dir, cache, trials, changes, warnings, growth)
    resolved["trials"] = [t for t, _ in trials]  # the spec's trials: others in trials/ are outside it
    if not dry_run:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        _apply(p)
        atomic_write_text(saved, yaml.safe_dump(resolved, sort_keys=True))
        for tid, cfg in p.trials:  # every trial has a folder from the start: tables list the ones never run
            if not (p.trial_dir(tid) / CONFIG).is_file():
                write_config(p.trial_dir(tid), cfg.to_json())
    return p


def _machine_problems(spec: JobSpec) -> list[str]:
    """What a trial asks of the machine it runs on that this machine lacks, one line each."""
    import torch

    out = resource_problems(spec, os.cpu_count() or 1, torch.cuda.device_count(), "this machine")
    if not torch.cuda.is_available() and any(c.device == "cuda" for _, c in spec.trials("")):
        out.append("device: cuda was asked for but torch sees no GPU here; set training.device: auto or cpu, "
                   "or run where there are GPUs")
    return out


def resource_problems(spec: JobSpec, cpus: float, gpus: float, where: str) -> list[str]:
    out = []
    if spec.cpu > cpus:
        out.append(f"resources.cpu: {spec.cpu:g} per trial, but {where} has {cpus:g} CPUs; lower it")
    if spec.gpu > gpus:
        out.append(f"resources.gpu: {spec.gpu:g} per trial, but {where} has {gpus:g} GPUs; "
                   "set resources.gpu: 0 or run where there are GPUs")
    return out


def describe(p: Plan) -> str:
    """The --dry-run text: every trial, its status and its resources."""
    lines = [f"sweep {p.spec.name}: {len(p.trials)} trials, {p.spec.cpu:g} CPU and {p.spec.gpu:g} GPU each, "
             f"retries {p.spec.retries}", f"results: {p.sweep_dir}", f"data: {p.data}"]
    if (p.sweep_dir / "spec.yaml").is_file():
        lines.append(f"change: {p.growth.line()}" if not p.changes else "change: nothing kept (see the warning)")
    for tid, cfg in p.trials:
        status = "to run" if p.changes else p.growth.label(tid)
        lines.append(f"  {tid:<36} {cfg.arch} width {cfg.width:g} {cfg.head} epochs {cfg.epochs}  [{status}]")
    lines += [f"  {tid:<36} [outside the spec: kept on disk, left out of the tables]" for tid in p.growth.outside]
    return "\n".join(lines)


def dry_run_warnings(p: Plan) -> list[str]:
    """What a dry run warns of: a real run that would be refused, resources this machine lacks."""
    out = [f"a real run would be refused: the spec changed since this sweep started ({'; '.join(p.changes[:4])}); "
           "run it under another name, or pass --force-new to start over"] if p.changes else []
    return out + [f"this machine could not run it: {w}" for w in p.warnings]


# ---------------------------------------------------------------------------- running the trials

def _trainable(config: dict[str, Any]) -> None:
    """A trial on Ray: run_trial in its stable folder, reporting each epoch to Tune."""
    import torch

    from .train import run_trial

    torch.set_num_threads(max(1, int(config["cpus"])))
    # Recorded in attempts.jsonl: the node and the Ray cluster that ran this attempt.
    os.environ["VGG_XAI_NODE"], os.environ["VGG_XAI_RAY"] = runtime.node()
    out = Path(config["trial_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / ERROR).unlink(missing_ok=True)
    cfg = TrialConfig.from_dict(config["config"])
    result = run_trial(cfg, out, report=lambda metrics, _ckpt: runtime.report(metrics), resume=True)
    runtime.report({"done_status": result.status, "test_acc": result.test_acc, "epoch": result.epochs_completed})


@dataclass
class Outcome:
    failed: list[str]  # errored after all retries
    unfinished: list[str]  # not run to the end (the driver was stopped)


def run(p: Plan, *, address: str | None = None, stream=None) -> Outcome:
    """Run the plan's unfinished trials on Ray (the cluster at ``address``, the one this process is
    connected to, or an embedded one), showing their progress on ``stream``.

    Ctrl-C stops it at once: KeyboardInterrupt, with Ray stopped and every checkpoint whole.
    """
    from .monitor import LiveTable, new_row, trial_row

    stream = stream or sys.stdout
    pending = p.pending()
    print(f"sweep {p.spec.name}: {len(pending)} trials to run, {len(p.trials) - len(pending)} finished earlier; "
          f"results in {p.sweep_dir}", file=stream, flush=True)
    if pending:
        rows = [trial_row(p.trial_dir(t), driver_alive=True, jobs_active=False) for t, c in p.trials]
        rows = [new_row(t, c.epochs) if r["status"] == "damaged" else r for r, (t, c) in zip(rows, p.trials)]
        for r in rows:  # as the sweep starts: finished, or waiting to run (from its checkpoint's epoch)
            if r["status"] not in FINISHED:
                r.update(status="pending", note="")
        table = LiveTable(p.spec.name, rows, stream, hint=f"vgg-xai status {p.sweep_dir}")
        started = runtime.ray_init(address)
        try:
            cpus, gpus = runtime.cluster_resources()
            problems = resource_problems(p.spec, cpus, gpus, "the Ray cluster")
            if problems:
                raise UserError(problems[0])
            items = [{"trial_id": t, "trial_dir": str(p.trial_dir(t)), "config": c.to_dict(), "cpus": p.spec.cpu}
                     for t, c in pending]
            errors = runtime.tune_grid(_trainable, items, resources={"cpu": p.spec.cpu, "gpu": p.spec.gpu},
                                       storage=p.sweep_dir / "ray", retries=p.spec.retries, on_event=table.event)
        finally:
            if started:
                runtime.ray_shutdown()
        if table.tty:
            print(file=stream)
        _record_errors(p, errors)
    failed = [t for t, _ in p.trials if (p.trial_dir(t) / ERROR).is_file()]
    return Outcome(failed, [t for t, _ in p.pending() if t not in failed])


def _record_errors(p: Plan, errors: dict[str, BaseException]) -> None:
    """error.txt for every trial that failed after its retries. A full disk is not the trial's
    fault: no error.txt, and the rerun after space is freed continues from the checkpoints."""
    full: DiskFull | None = None
    for tid, err in errors.items():
        if finished(p.trial_dir(tid)):
            continue
        if isinstance(err, DiskFull):
            full = full or err
            continue
        try:
            write_error(p.trial_dir(tid), runtime.error_text(err))
        except DiskFull as e:
            full = full or e
    if full is not None:
        raise full
