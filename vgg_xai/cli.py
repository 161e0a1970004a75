"""The `vgg-xai` command: thin subcommands over the modules."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .errors import UserError

_TRAIN_FLAGS = {  # flag -> (TrialConfig field, type, help)
    "--arch": ("arch", str, "vgg11_cifar (default) or simple_cnn"),
    "--variant": ("variant", str, "plain, bn, bn_dropout, l2, bn_augment (simple_cnn: bn_l2, bn_l2_augment)"),
    "--lr-schedule": ("lr_schedule", str, "const_1e-3 (default), const_1e-2 or alternate"),
    "--alternate-period": ("alternate_period", int, "epochs per phase of the alternate schedule (1)"),
    "--epochs": ("epochs", int, "epochs to train (15)"),
    "--batch-size": ("batch_size", int, "batch size (128)"),
    "--width": ("width", float, "multiplier on conv channels: 1 for the study, 0.125 for a CPU"),
    "--head": ("head", str, "mlp (512-1000-512-10, default) or linear (GAP -> Linear)"),
    "--init": ("init", str, "torch_default (default) or kaiming"),
    "--l2-coef": ("l2_coef", float, "L2 penalty of the l2 switch (5e-4)"),
    "--seed": ("seed", int, "seed of init, shuffling, augmentation and dropout (0)"),
    "--train-size": ("train_size", int, "class-balanced train subset (default: all 40,000)"),
    "--valid-size": ("valid_size", int, "class-balanced valid subset (default: all 10,000)"),
    "--test-size": ("test_size", int, "class-balanced test subset (default: all 10,000)"),
    "--precision": ("precision", str, "auto (bf16 autocast where supported), fp32 or bf16"),
    "--device": ("device", str, "auto, cpu or cuda"),
}


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from .config import DEFAULT_CACHE

    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help=f"the prepared HDF5 cache to write or reuse (default: {DEFAULT_CACHE})")


def _add_spec_args(p: argparse.ArgumentParser, example: str) -> None:
    """The arguments of the commands that run a job spec (read back by _load_spec)."""
    p.add_argument("spec", type=Path, help=f"the job spec, e.g. {example}")
    p.add_argument("--data", help="a CIFAR-10 source or prepared cache (overrides the spec's data.source)")
    p.add_argument("--results", type=Path, help="the results root (overrides the spec's results)")
    p.add_argument("--force-new", action="store_true",
                   help="start over when the spec changed (the earlier folder is moved aside, not deleted)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one value of the spec (repeatable): KEY is a dotted path into it, VALUE is "
                        "YAML, checked as if written in the file, e.g. --set training.epochs=1 "
                        "--set 'grid.variant=[bn, plain]' --set resources.gpu=0.25")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vgg-xai",
        description="Train and interpret a grid of VGG11-CIFAR variants: data, single trials, Ray Tune sweeps, SLURM.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser(
        "data", help="prepare the CIFAR-10 cache",
        description="Prepare CIFAR-10 for training: `vgg-xai data prepare` decodes one source (the official "
                    "pickled batches, an ImageFolder tree or archive, or a torchvision download) once into the "
                    "HDF5 cache that `train` and `sweep` read. `vgg-xai data prepare --help` lists its options.")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = dsub.add_parser(
        "prepare", help="turn a CIFAR-10 source into the cache training reads",
        description="Decode a CIFAR-10 source once into one HDF5 cache: uint8 images, the 40k/10k/10k "
                    "train/valid/test split and the train split's channel statistics. Idempotent.")
    prep.add_argument("--source", type=Path, default=None,
                      help="an extracted cifar-10-batches-py folder, or an ImageFolder tree "
                           "(train/<class>/*, test/<class>/*) as a folder, .tar or .tar.gz; "
                           "omitted: download with torchvision")
    _add_data_args(prep)
    prep.add_argument("--split-seed", type=int, default=0, help="seed of the train/valid split (0)")
    prep.add_argument("--force", action="store_true", help="replace a cache made from another source")

    train = sub.add_parser(
        "train", help="run one trial",
        description="Train one configuration for its epochs with Adam and write checkpoints, "
                    "history.csv and features.h5 to --out. Flags override the --config YAML.")
    train.add_argument("--config", type=Path, help="a YAML file of trial settings (keys as in config.json)")
    train.add_argument("--data", type=Path,
                       help="a prepared cache (.h5) or a source to prepare first (default: the default cache)")
    _add_data_args(train)
    for flag, (_, typ, help_) in _TRAIN_FLAGS.items():
        train.add_argument(flag, type=typ, default=None, help=help_)
    train.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (CUDA)")
    train.add_argument("--out", type=Path, required=True, help="the trial's output folder")
    train.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt if it exists")

    sweep = sub.add_parser(
        "sweep", help="run a job spec's grid of trials on Ray Tune",
        description="Expand a job spec (jobs/*.yaml) into trials and run them on Ray: in this process "
                    "by default, or on a running cluster with --address. Running the same command "
                    "again continues an interrupted sweep; finished trials are not rerun.")
    _add_spec_args(sweep, "jobs/smoke.yaml")
    sweep.add_argument("--address", help="join a running Ray cluster ('auto' or HOST:PORT) instead of starting one")
    sweep.add_argument("--dry-run", action="store_true", help="print the expanded trials and resources; run nothing")

    submit = sub.add_parser(
        "submit", help="submit a sweep to SLURM (and its post-processing job after it)",
        description="Submit a job spec to SLURM with submitit: one sweep job running Ray inside the "
                    "allocation (--mode ray) or one array task per trial (--mode array), then the "
                    "post-processing job after it, whatever its outcome (afterany). Prints the job ids and the "
                    "results folder.")
    _add_spec_args(submit, "jobs/seed.yaml")
    submit.add_argument("--cluster", type=Path, required=True,
                        help="the cluster profile, e.g. cluster/example-gpu.yaml")
    submit.add_argument("--mode", choices=("ray", "array"), default="ray",
                        help="ray: one job, Ray schedules the trials (default); array: one SLURM array task a trial")
    submit.add_argument("--max-concurrent", type=int, help="array mode: at most this many tasks at once")

    st = sub.add_parser(
        "status", help="a sweep's progress: per trial state, epoch, accuracy, where it runs; ETA",
        description="Show a sweep's progress, local or on SLURM, read from its folder (no Ray is joined): "
                    "done / running / pending / failed, elapsed and ETA, whether its driver is alive (or its "
                    "SLURM jobs' states), then per trial its state, epoch, accuracies, images/s, ETA and where "
                    "it runs (host:PID or SLURM job), with the last error line of a failed one. Works from any "
                    "terminal, during and after a sweep.")
    st.add_argument("sweep_dir", type=Path, help="the sweep's results folder, e.g. results/seed")
    st.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                    help="redraw every SECONDS (default 2) until the sweep stops or Ctrl-C")
    cancel = sub.add_parser(
        "cancel", help="cancel a submitted sweep's SLURM jobs",
        description="Cancel the SLURM jobs of a sweep folder's latest `vgg-xai submit` (the sweep job and the "
                    "post-processing job after it, or the array tasks) and print their ids. The trials' "
                    "checkpoints stay: submitting the same spec again resumes the unfinished trials.")
    cancel.add_argument("sweep_dir", type=Path, help="the sweep's results folder, e.g. results/seed")
    logs = sub.add_parser(
        "logs", help="print one trial's log (every attempt) and its SLURM array tasks' output",
        description="Print a trial's own log, trials/<id>/trial.log: per attempt, where it ran (host, PID, "
                    "SLURM job or array task, Ray node) and from which epoch, its warnings, one line per epoch, "
                    "then its result or the traceback it failed with. For a trial run as a SLURM array task "
                    "(`vgg-xai submit --mode array`), the stdout and stderr SLURM kept of each of its tasks follow, "
                    "each under its own heading.")
    logs.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR", help="the sweep's results folder, e.g. results/seed")
    logs.add_argument("trial_id", metavar="TRIAL_ID",
                      help="the trial, e.g. bn_augment-lr1e-3-s0 (`vgg-xai status SWEEP_DIR` lists them)")

    post = sub.add_parser(
        "postprocess", help="interpret every finished trial; write tables, figures and report.html",
        description="Run the interpretation suite on each completed trial of a sweep folder (filters, "
                    "feature maps, CAMs, faithfulness, the randomization check, t-SNE, GMM, calibration), "
                    "trials in parallel on Ray, then write tables/, figures/ and report.html. Idempotent: "
                    "trials whose outputs are newer than their checkpoint are skipped; safe to run twice at once.")
    post.add_argument("sweep_dir", type=Path, help="the sweep's results folder, e.g. results/seed")
    post.add_argument("--workers", type=int, help="trials interpreted at once (default: the CPUs available)")
    post.add_argument("--address", help="use a running Ray cluster ('auto' or HOST:PORT) instead of starting one")
    post.add_argument("--force", action="store_true", help="interpret every trial again, even when up to date")
    post.add_argument("--tables-only", action="store_true", help="only aggregate the tables (seconds)")
    post.add_argument("--cam-methods", default="gradcam,hirescam,gradcam++",
                      help="CAM methods to draw, comma-separated, the first one also scored for faithfulness "
                           "and the randomization check (default: %(default)s; plain CAM is added for head=linear)")
    post.add_argument("--tsne-method", choices=("auto", "fft", "bh"), default="auto",
                      help="openTSNE's gradient method: auto (the faster one where it runs: FFT from 10,000 points "
                           "where openTSNE was built with FFTW, Barnes-Hut otherwise; default), fft or bh")
    post.add_argument("--probes-per-class", type=int, default=1,
                      help="probe images per class for feature maps and CAMs (default: %(default)s)")

    res = sub.add_parser(
        "results", help="print a sweep folder's results table, or pull one from a cluster",
        usage="vgg-xai results SWEEP_DIR [SWEEP_DIR ...] [--format {table,md,csv,json,latex}] [--metric METRIC]\n"
              "       vgg-xai results SWEEP_DIR [SWEEP_DIR ...] --compare [--ref-variant V] [--ref-schedule S]\n"
              "       vgg-xai results SWEEP_DIR --sort METRIC [--top N] [--format {table,md,csv,json}]\n"
              "       vgg-xai results pull SRC DEST",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Four forms:\n\n"
                    "  vgg-xai results SWEEP_DIR    print the variant x schedule pivot of a metric (mean ± std\n"
                    "                               over seeds, the 95% t-interval of the mean, n) of a local\n"
                    "                               sweep folder, read from its trial folders (or, without\n"
                    "                               trials/, its tables/accuracy.json); several folders of one\n"
                    "                               study are pooled\n"
                    "  vgg-xai results SWEEP_DIR --compare\n"
                    "                               say which cells differ beyond the noise between seeds:\n"
                    "                               each variant against a reference variant, each schedule\n"
                    "                               against a reference schedule, with intervals, Holm-adjusted\n"
                    "                               p-values, verdicts and the seeds that would decide the rest\n"
                    "  vgg-xai results SWEEP_DIR --sort METRIC [--top N]\n"
                    "                               print one row per trial instead, best first by METRIC\n"
                    "                               (lower first for ece, deletion_auc, sanity_rho, wall_s),\n"
                    "                               trials without a value last; --top N keeps the first N\n"
                    "  vgg-xai results pull SRC DEST\n"
                    "                               copy a sweep folder's spec, tables, figures, report and\n"
                    "                               per-trial metrics (never checkpoints or feature dumps)\n"
                    "                               with rsync; SRC is HOST:PATH (over ssh) or a local folder,\n"
                    "                               DEST always a local folder (write ./NAME for a folder\n"
                    "                               whose name begins with '-' or has a colon)",
        epilog="examples:\n"
               "  vgg-xai results results/seed\n"
               "  vgg-xai results results/seed --format latex --metric ari\n"
               "  vgg-xai results results/seed --sort test_acc --top 5\n"
               "  vgg-xai results results/cpu results/cpu-seeds --compare\n"
               "  vgg-xai results pull HOST:/scratch/me/results/seed ./results/seed\n"
               "(a local folder named pull: write ./pull)")
    res.add_argument("target", metavar="SWEEP_DIR|pull", help="a sweep's results folder, e.g. results/seed; "
                                                              "or the word pull")
    res.add_argument("paths", nargs="*", metavar="SWEEP_DIR|SRC DEST",
                     help="more sweep folders, their trials pooled with the first's (the same trial counts once); "
                          "with pull: where from and where to")
    res.add_argument("--format", choices=("table", "md", "csv", "json", "latex"), default=None,
                     help="table (default: for the terminal), md, csv (long form: variant,schedule,metric,mean,"
                          "std,ci_low,ci_high,n,of,degenerate,interpretation_failed), json (the pivot and the rows) "
                          "or latex (a booktabs tabular); with --sort or --compare: table, md, csv or json")
    res.add_argument("--metric", default=None,
                     help="the column to pivot: test_acc (default), best_valid_acc, best_epoch, epochs, wall_s, "
                          "or an interpretation metric: ari, nmi, purity, ece, deletion_auc, deletion_auc_random, "
                          "deletion_vs_random, deletion_wins, insertion_auc, insertion_auc_random, "
                          "insertion_vs_random, insertion_wins, sanity_rho, sanity_floor, sanity_abs_rank_rho, "
                          "sanity_abs_floor")
    res.add_argument("--sort", metavar="METRIC", default=None,
                     help="print the trials instead of the pivot, best first by METRIC (any --metric name; "
                          "higher first but for ece, deletion_auc, sanity_rho and wall_s), no value last")
    res.add_argument("--top", type=int, metavar="N", default=None, help="with --sort: only the first N trials")
    res.add_argument("--compare", action="store_true",
                     help="compare cells instead: within each schedule every variant against a reference variant, "
                          "within each variant every schedule against a reference schedule; the difference with its "
                          "95%% interval, Welch's t (or an exact permutation test), Holm-adjusted p, a verdict "
                          "(beyond or within seed noise) and the seeds that would decide it (any --metric)")
    res.add_argument("--ref-variant", metavar="VARIANT", default=None,
                     help="with --compare: the reference variant (default: the spec's compare.variant, else plain)")
    res.add_argument("--ref-schedule", metavar="SCHEDULE", default=None,
                     help="with --compare: the reference schedule (default: the spec's compare.schedule, else "
                          "const_1e-3)")
    return parser


def _load_spec(args: argparse.Namespace):
    import dataclasses

    from .config import JobSpec

    spec = JobSpec.from_yaml(args.spec, overrides=args.set)
    if args.results is not None:
        spec = dataclasses.replace(spec, results=str(args.results))
    return spec


def _spec_command(command: str, args: argparse.Namespace, *extra: str) -> list[str]:
    """The command line that runs this spec again as given (--force-new left out: the rerun continues)."""
    argv = ["vgg-xai", command, str(args.spec)]
    if args.data is not None:
        argv += ["--data", str(args.data)]
    if args.results is not None:
        argv += ["--results", str(args.results)]
    for s in args.set:
        argv += ["--set", s]
    return argv + list(extra)


def _cmd_submit(args: argparse.Namespace) -> int:
    from .config import ClusterProfile
    from .monitor import record_command
    from .slurm import submit

    out = submit(_load_spec(args), ClusterProfile.from_yaml(args.cluster), data=args.data, mode=args.mode,
                 max_concurrent=args.max_concurrent, force_new=args.force_new)
    extra = ["--cluster", str(args.cluster)] + (["--mode", args.mode] if args.mode != "ray" else []) + \
        (["--max-concurrent", str(args.max_concurrent)] if args.max_concurrent is not None else [])
    record_command(Path(out["sweep_dir"]), _spec_command("submit", args, *extra))
    for j in out["jobs"]:
        print(f"{j['role']:<12} {j['job_id']}" + (f"  {j['trial_id']}" if "trial_id" in j else ""))
    print(f"results: {out['sweep_dir']}")
    print(f"follow:  vgg-xai status {out['sweep_dir']}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from . import monitor
    from .slurm import jobs_view

    if args.watch is None:
        print(monitor.status(args.sweep_dir, jobs=jobs_view))
        return 0
    if args.watch <= 0:
        raise UserError(f"--watch: must be a positive number of seconds, got {args.watch:g}")
    try:
        monitor.watch(args.sweep_dir, every=args.watch, jobs=jobs_view)
    except KeyboardInterrupt:
        print()
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from .slurm import cancel

    print("cancelled: " + " ".join(cancel(args.sweep_dir)))
    return 0


def _cmd_postprocess(args: argparse.Namespace) -> int:
    from .postprocess import Settings, postprocess
    from .results import format_pivot

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers: must be >= 1, got {args.workers}")
    from .interpret.cam import METHODS

    methods = tuple(m.strip() for m in args.cam_methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS or m == "cam"]
    if not methods or bad:
        raise UserError(f"--cam-methods: {', '.join(bad) or 'none given'}; choose from gradcam, hirescam, gradcam++ "
                        "(plain cam is added by itself where the head is linear)")
    if args.probes_per_class < 1:
        raise UserError(f"--probes-per-class: must be >= 1, got {args.probes_per_class}")
    settings = Settings(cam_method=methods[0], cam_methods=methods, probes_per_class=args.probes_per_class,
                        tsne_method=args.tsne_method)
    s = postprocess(args.sweep_dir, settings, workers=args.workers, address=args.address, force=args.force,
                    tables_only=args.tables_only)
    print(format_pivot(s.pivot))
    if not args.tables_only:
        print(f"\ninterpreted {len(s.done)} trials, {len(s.skipped)} up to date; report: {s.report}")
    for t, e in s.failed.items():
        print(f"interpretation failed: {t}: {e} (see {args.sweep_dir}/trials/{t}/interpret/error.txt)",
              file=sys.stderr)
    return 1 if s.failed else 0


def _cmd_results(args: argparse.Namespace) -> int:
    from .compare import render_compare, spec_reference
    from .results import pool_rows, pull, pull_summary, render, render_ranked

    if args.target == "pull":
        if len(args.paths) != 2:
            raise UserError("results pull: expected SRC DEST, e.g. "
                            "`vgg-xai results pull HOST:/scratch/me/results/seed results/seed`")
        if args.format is not None or args.metric is not None or args.sort is not None or args.top is not None:
            raise UserError("results pull: --format, --metric, --sort and --top are for reading a folder; "
                            "pull first, then run `vgg-xai results DEST --format ...`")
        print(pull_summary(pull(*args.paths)))
        return 0
    dirs = [args.target, *args.paths]  # several sweep folders: their trials pooled
    if (args.ref_variant or args.ref_schedule) and not args.compare:
        raise UserError("--ref-variant and --ref-schedule choose the references of --compare; add --compare")
    if args.compare:
        if args.sort is not None or args.top is not None:
            raise UserError("--compare compares cells; --sort and --top rank trials: pass one of them")
        ref = spec_reference(dirs[0])
        sys.stdout.write(render_compare(pool_rows(dirs), args.metric or "test_acc", args.format or "table",
                                        args.ref_variant or ref.get("variant"),
                                        args.ref_schedule or ref.get("schedule")))
        return 0
    if args.sort is None:
        if args.top is not None:
            raise UserError(f"--top: ranks trials by --sort METRIC; e.g. --sort test_acc --top {args.top}")
        sys.stdout.write(render(pool_rows(dirs), args.metric or "test_acc", args.format or "table"))
        return 0
    if args.metric is not None:
        raise UserError("--metric picks the pivot's metric, --sort the one the trials are ranked by; pass one of them")
    if args.top is not None and args.top < 1:
        raise UserError(f"--top: must be >= 1, got {args.top}")
    sys.stdout.write(render_ranked(pool_rows(dirs), args.sort, args.format or "table", top=args.top))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from .logs import trial_logs

    sys.stdout.write(trial_logs(args.sweep_dir, args.trial_id))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .data import prepare

    path = prepare(args.source, args.cache, split_seed=args.split_seed, force=args.force)
    print(path)
    return 0


def _resolve_data(data: Path | None, cache: Path) -> Path:
    from .data import load_cache, prepare

    if data is None:
        load_cache(cache)  # a clear error when it is missing
        return cache.absolute()
    if data.suffix in (".h5", ".hdf5") and data.is_file():
        return data.absolute()
    return prepare(data, cache)


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import TrialConfig, load_yaml
    from .data import verify_cache
    from .train import check_install, run_trial

    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: is a file; name a folder for the trial's files")
    settings = load_yaml(args.config) if args.config else {}
    for flag, (key, _, _) in _TRAIN_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            settings[key] = value
    if args.compile:
        settings["compile"] = True
    if args.data is not None or "data" not in settings:
        settings["data"] = str(_resolve_data(args.data, args.cache))
    cfg = TrialConfig.from_dict(settings, where=str(args.config or "flags"))
    verify_cache(cfg.data)  # a damaged cache or one of other classes is one line, as in a sweep, before any work
    check_install()
    result = run_trial(cfg, args.out, report=_print_epoch, resume=args.resume)
    print(json.dumps(result.__dict__, indent=2))
    from .trial_folder import TESTED

    return 0 if result.status in TESTED else 1  # a collapsed trial is tested too: its result is at chance


def _print_epoch(m: dict, _ckpt: Path) -> None:
    from .train import format_epoch

    print(format_epoch(m), flush=True)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from . import sweep
    from .locks import driving
    from .monitor import record_command

    spec = _load_spec(args)
    if args.dry_run:
        plan = sweep.plan(spec, data=args.data, dry_run=True, check_local=not args.address)
        print(sweep.describe(plan))
        for w in sweep.dry_run_warnings(plan):
            print(f"vgg-xai: warning: {w}", file=sys.stderr)
        return 0
    sweep.check_inputs(spec, data=args.data, check_local=not args.address, address=args.address)  # nothing written yet
    with driving(sweep.sweep_dir_of(spec)):
        plan = sweep.plan(spec, data=args.data, force_new=args.force_new, check_local=not args.address)
        record_command(plan.sweep_dir, _spec_command("sweep", args, *(["--address", args.address] if args.address
                                                                       else [])))
        try:
            outcome = sweep.run(plan, address=args.address)
        except KeyboardInterrupt:
            left = len(plan.pending())
            print(f"\nstopped: {left} of {len(plan.trials)} trials unfinished, each kept at its last checkpoint; "
                  f"run the same command again to continue", file=sys.stderr, flush=True)
            return 130
        return _after_sweep(plan, outcome, args.address)


def _after_sweep(plan, outcome, address: str | None) -> int:
    """Post-processing after a sweep, then what the user needs to know: the pivot, where the tables
    and the report are, and what failed."""
    from .postprocess import postprocess
    from .results import format_pivot

    post = postprocess(plan.sweep_dir, address=address)
    print(f"\n{format_pivot(post.pivot)}\n\ntables: {plan.sweep_dir / 'tables'}\nreport: {post.report}", flush=True)
    if post.failed:
        print(f"interpretation failed for {', '.join(post.failed)} (see trials/<id>/interpret/error.txt)", flush=True)
    if outcome.failed:
        print(f"failed after {plan.spec.retries} retries: {', '.join(outcome.failed)} (see trials/<id>/error.txt)",
              flush=True)
    if outcome.unfinished:
        print(f"stopped with {len(outcome.unfinished)} trials unfinished; run the same command again to continue",
              flush=True)
    return 130 if outcome.unfinished else (1 if outcome.failed else 0)


COMMANDS = {"data": _cmd_prepare, "train": _cmd_train, "sweep": _cmd_sweep, "submit": _cmd_submit,
            "status": _cmd_status, "cancel": _cmd_cancel, "postprocess": _cmd_postprocess,
            "results": _cmd_results, "logs": _cmd_logs}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"vgg-xai: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vgg-xai: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
