"""`run_trial`: the one function that trains and evaluates one configuration.

It knows nothing of Ray or SLURM: it is handed a ``report(metrics, checkpoint_path)`` callable,
and each of those wraps it in a few lines. Files it writes in ``out_dir``:
config.json, checkpoint_init.pt, checkpoint.pt (after every epoch; the one before it is kept as
checkpoint.prev.pt, each with its digest in a .sha256 file), history.csv, features.h5, result.json,
attempts.jsonl and trial.log (appended by every attempt), and tensorboard/ (event files, where the
tensorboard package is installed).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, collapse, features, trial_folder
from .config import TrialConfig
from .data import DeviceSplit, load_splits, make_augment
from .errors import DamagedCheckpoint, UserError
from .model import ConvNet, build_model
from .progress import progress
from .trial_folder import CHECKPOINT, HISTORY_COLUMNS

Report = Callable[[dict[str, Any], Path], None]


@dataclass
class TrialResult:
    trial_id: str
    status: str  # completed | diverged | collapsed
    epochs_completed: int
    best_valid_acc: float
    best_epoch: int
    test_loss: float
    test_acc: float
    wall_s: float  # over every attempt: this attempt's time and the epochs earlier attempts trained
    attempt_s: float | None = None  # this (the last) attempt's time, start to end
    attempts: int = 1  # attempts that ran the trial, this one included (attempts.jsonl)
    collapsed: str | None = None  # why it stopped early, where its network collapsed for good


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for but torch sees no GPU; use --device cpu or auto")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, channels_last).

    channels_last always: oneDNN on the CPU and tensor cores on CUDA both run NHWC convs faster
    (measured on a 2-core CPU at width 0.125: 1.27x in fp32, 1.22x in bf16).
    """
    if precision == "bf16" or (precision == "auto" and (device.type == "cuda" or cpu_supports_bf16())):
        return torch.bfloat16, True
    return None, True


def epoch_seed(seed: int, epoch: int) -> int:
    """Every epoch draws its randomness from its own seed, so a resumed run repeats it exactly."""
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def evaluate(model: ConvNet, split: DeviceSplit, batch_size: int, dtype: torch.dtype | None,
             channels_last: bool) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Loss, accuracy, feature vectors and logits of a split (model in eval mode)."""
    model.eval()
    feats, logits = [], []
    with torch.inference_mode():
        for x, _ in split.batches(batch_size):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(split.device, dtype):
                f, out = model.features_and_logits(x)
            feats.append(f.float())
            logits.append(out.float())
        f_all, l_all = torch.cat(feats), torch.cat(logits)
        loss = F.cross_entropy(l_all, split.labels).item()
        acc = (l_all.argmax(1) == split.labels).float().mean().item()
    return loss, acc, f_all.cpu().numpy(), l_all.cpu().numpy()


def train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, split: DeviceSplit, batch_size: int, *,
                generator: torch.Generator | None, augment: torch.nn.Module | None, dtype: torch.dtype | None,
                channels_last: bool, on_step: Callable[[], Any] | None = None,
                max_batches: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of training steps; returns (summed loss, correct count) as device tensors."""
    device = split.device
    model.train()
    # Accumulate on the device: no host sync per step.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for i, (x, y) in enumerate(split.batches(batch_size, generator=generator, augment=augment)):
        if max_batches is not None and i >= max_batches:
            break
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        if on_step is not None:
            on_step()
    return loss_sum, correct


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def check_install() -> None:
    """Import what a trial needs only at its end (the feature dump records their versions) before any
    trial starts: a torchvision built for another torch then fails here, in one line naming it and the
    fix, and not after the last epoch of every trial."""
    for name in ("torchvision", "kornia", "h5py"):
        try:
            __import__(name)
        except Exception as e:  # noqa: BLE001 - whatever a broken build raises on import (RuntimeError, OSError)
            text = str(e).strip()
            first = text.splitlines()[0] if text else type(e).__name__
            raise UserError(f"{name} does not work with the installed torch {torch.__version__} ({first}); install "
                            f"the {name} built for this torch (for torchvision, the release paired with torch "
                            f"{torch.__version__.split('+')[0]}), e.g. pip install --force-reinstall {name}") from None


def versions() -> dict[str, str]:
    import h5py
    import kornia
    import torchvision

    from . import __version__

    return {"vgg_xai": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "h5py": h5py.__version__, "kornia": kornia.__version__}


def _check_resumable(saved: dict[str, Any], cfg: TrialConfig, path: Path) -> None:
    """A checkpoint continues only the trial it came from (the epoch count may grow)."""
    diff = sorted(cfg.changes_from(saved, ignore=("epochs", "stop_dead")))  # both may change
    if diff:
        raise UserError(f"{path}: checkpoint is of another trial configuration (differs in "
                        f"{', '.join(diff)}); use another out dir or start without resume")


def _last_good(path: Path, cfg: TrialConfig) -> tuple[Path | None, dict[str, Any] | None, str | None]:
    """The newest checkpoint of this trial that loads, ``path`` or else the previous one kept beside
    it, as (its path, its contents, the warning that it passed over a damaged one or None);
    (None, None, warning) when neither loads."""
    damaged: list[DamagedCheckpoint] = []
    source: Path | None = None
    saved: dict[str, Any] | None = None
    for p in (path, checkpoint.previous_path(path)):
        if p.is_file():
            try:
                saved = checkpoint.load(p)
            except DamagedCheckpoint as e:
                damaged.append(e)
                continue
            source = p
            _check_resumable(saved["config"], cfg, p)
            break
    if damaged:
        then = (f"resuming from {source.name} at epoch {saved['epoch'] + 2} of {cfg.epochs}"
                if source is not None and saved is not None else f"starting again at epoch 1 of {cfg.epochs}")
        bad = "; ".join(f"{e.path} is damaged ({e.reason})" for e in damaged)
        return source, saved, f"{bad}; {then}"
    return source, saved, None


def format_epoch(m: dict[str, Any]) -> str:
    """One history row as one line (as `vgg-xai train` prints it)."""
    return (f"epoch {m['epoch']:>3}  lr {m['lr']:.0e}  train {m['train_loss']:.4f} / {m['train_acc']:.3f}  "
            f"valid {m['valid_loss']:.4f} / {m['valid_acc']:.3f}  {m['images_per_s']:.0f} img/s  {m['seconds']:.1f}s")


class TrialLog:
    """``trial.log`` in the trial folder: the trial's own account of every attempt, wherever it ran
    (this process, a Ray worker, a SLURM array task), which `vgg-xai logs` prints.

    Per attempt: a header (who ran it, where, from which epoch), its warnings, one line per epoch,
    then its result or the traceback it failed with. Appended a line at a time, so it shows how far
    a killed attempt got; a line that cannot be written is lost, never the trial.
    """

    HEADER = "=== attempt "

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = False

    def write(self, text: str) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {text.rstrip()}\n")
        except OSError:
            pass

    def start(self, where_from: str) -> None:
        try:
            with open(self.path) as f:
                attempt = 1 + sum(self.HEADER in line for line in f)
        except OSError:
            attempt = 1
        env = os.environ.get
        where = [f"PID {os.getpid()}"]
        if env("SLURM_JOB_ID"):
            where.append(f"SLURM job {env('SLURM_JOB_ID')}")
        if env("SLURM_ARRAY_JOB_ID"):
            where.append(f"array task {env('SLURM_ARRAY_JOB_ID')}_{env('SLURM_ARRAY_TASK_ID', '?')}")
        if env("VGG_XAI_NODE"):
            where.append(f"Ray node {env('VGG_XAI_NODE')}")
        self.write(f"{self.HEADER}{attempt} on {socket.gethostname()} ({', '.join(where)}): {where_from}")
        self.started = True

    def warn(self, message: str) -> None:
        """A warning: one line on stderr, as ever, and in the log."""
        print(f"vgg-xai: warning: {message}", file=sys.stderr, flush=True)
        self.write(f"warning: {message}")

    def failed(self) -> None:
        """The exception being handled, with its traceback (called from an except block)."""
        if not self.started:
            self.start("failed before it knew its start epoch")
        self.write(f"failed:\n{traceback.format_exc()}")


class Scalars:
    """The trial's TensorBoard event files in ``tensorboard/``, where the tensorboard package is
    installed: loss/train, loss/valid, accuracy/train, accuracy/valid and lr, the step being the
    epoch number (1, 2, ...).

    Each attempt deletes the event files before it and writes the history it resumes from again,
    into one new file, then its own epochs; so the files hold every epoch once, with the values of
    history.csv, whatever attempts and checkpoint fallbacks came before. (purge_step alone would hide
    the earlier attempts' repeated epochs from TensorBoard, but leave them in the files for every
    other reader.) The new file's purge_step=1 makes a TensorBoard that already read the deleted files
    drop what it holds of them. TensorBoard is optional: an error here warns once and stops the
    writing; it never fails the trial.
    """

    def __init__(self, folder: Path, log: TrialLog) -> None:
        self.folder, self.log = folder, log
        self.writer: Any = None

    def open(self, history: list[dict[str, Any]]) -> None:
        """Delete the earlier event files; start this attempt's with the ``history`` it resumes from."""
        try:
            for old in self.folder.glob("events.out.tfevents.*"):
                old.unlink()
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # not installed: no event files
                return
            self.writer = SummaryWriter(str(self.folder), purge_step=1)
            for row in history:
                self.add(row)
        except Exception as e:  # noqa: BLE001 - whatever TensorBoard raises, the trial goes on
            self._give_up(e)

    def add(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        try:
            for tag, key in (("loss/train", "train_loss"), ("loss/valid", "valid_loss"),
                             ("accuracy/train", "train_acc"), ("accuracy/valid", "valid_acc"), ("lr", "lr")):
                if math.isfinite(row[key]):  # a diverged epoch has no valid numbers
                    self.writer.add_scalar(tag, row[key], global_step=row["epoch"])
            self.writer.flush()  # a running TensorBoard shows the epoch now
        except Exception as e:  # noqa: BLE001
            self._give_up(e)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as e:  # noqa: BLE001
                self._give_up(e)

    def _give_up(self, e: Exception) -> None:
        self.log.warn(f"tensorboard: {type(e).__name__}: {e}; no more event files in this attempt")
        self.writer = None


def _attempts_since_start(out: Path, log: TrialLog) -> int:
    """The attempts that trained the weights this attempt ends with: from the last one that started at
    epoch 0 (a run from scratch in the same folder before it is another training) to this one."""
    try:
        starts = [a.get("start_epoch") for a in trial_folder.read_attempts(out)]
    except trial_folder.Damaged as e:  # the record of where it ran, not the training: say so and go on
        log.warn(str(e))
        return 1
    first = max((i for i, s in enumerate(starts) if s == 0), default=0)
    return max(1, len(starts) - first)


def run_trial(cfg: TrialConfig, out_dir: str | Path, report: Report | None = None,
              resume: bool | str | Path | None = None) -> TrialResult:
    """Train ``cfg`` for its epochs with Adam, then dump test-set features.

    ``resume``: True continues from ``out_dir/checkpoint.pt`` when it exists, or, when that one is
    damaged, from the previous one kept beside it (saying so in one line on stderr); a path
    continues from that checkpoint. A run interrupted after epoch k and resumed ends with the same
    weights and history as an uninterrupted run (bitwise on the CPU).

    The ``l2`` switch is coupled weight decay: Adam's ``weight_decay=l2_coef`` adds
    ``l2_coef * w`` to each gradient, the gradient of an explicit ``l2_coef/2 * ||w||^2``
    loss term, before Adam's moment estimates (not AdamW's decoupled decay).
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = TrialLog(out / "trial.log")
    scalars = Scalars(out / "tensorboard", log)
    try:
        return _run_trial(cfg, out, report, resume, log, scalars, t_start)
    except BaseException:
        log.failed()
        raise
    finally:
        scalars.close()


@dataclass
class _Start:
    """Where an attempt starts: the checkpoint it resumes from and what it holds (None: from scratch),
    and the warning that it passed over a damaged one."""
    source: Path | None = None
    saved: dict[str, Any] | None = None
    warning: str | None = None

    @property
    def epoch(self) -> int:
        return self.saved["epoch"] + 1 if self.saved is not None else 0


@dataclass
class _Run:
    """What an attempt trains with: the data, the model and its optimizer, the history so far."""
    cfg: TrialConfig
    device: torch.device
    dtype: torch.dtype | None
    channels_last: bool
    splits: dict[str, DeviceSplit]
    classes: list[str]
    net: ConvNet
    opt: torch.optim.Optimizer
    history: list[dict[str, Any]]


def _run_trial(cfg: TrialConfig, out: Path, report: Report | None, resume: bool | str | Path | None,
               log: TrialLog, scalars: Scalars, t_start: float) -> TrialResult:
    # The checkpoint first: where the attempt starts goes into the log before the slow steps.
    start = _resume_point(cfg, out / CHECKPOINT, resume)
    trial_folder.write_config(out, cfg.to_json())  # not before a refused resume
    resumed = f" (resumed from {start.source.name})" if start.source is not None else ""
    log.start(f"start epoch {start.epoch + 1} of {cfg.epochs}{resumed}" if start.epoch < cfg.epochs
              else f"all {cfg.epochs} epochs trained earlier{resumed}")
    if start.warning:
        log.warn(start.warning)
    run = _set_up(cfg, start, out)
    earlier_s = sum(float(r["seconds"]) for r in run.history)  # earlier attempts' epochs count in wall_s
    _record_attempt(out, start.epoch, run)
    scalars.open(run.history)
    status, why = _train_epochs(run, start.epoch, out, log, scalars, report)
    return _finish(run, status, why, out, log, earlier_s, t_start)


def _resume_point(cfg: TrialConfig, ckpt_path: Path, resume: bool | str | Path | None) -> _Start:
    """The checkpoint this attempt continues from, per ``resume`` (see run_trial)."""
    if resume is True:
        start = _Start(*_last_good(ckpt_path, cfg))
        if start.source is not None and start.source != ckpt_path:
            # A damaged latest checkpoint must not be kept as the previous one by the next save.
            checkpoint.discard(ckpt_path)
        return start
    if resume and Path(resume).is_file():
        saved = checkpoint.load(Path(resume))
        _check_resumable(saved["config"], cfg, Path(resume))
        return _Start(Path(resume), saved)
    return _Start()


def _set_up(cfg: TrialConfig, start: _Start, out: Path) -> _Run:
    """Load the data, build the model and its optimizer, and restore them from ``start``'s checkpoint;
    from scratch, clear an earlier run's checkpoints and keep the initial weights."""
    device = resolve_device(cfg.device)
    dtype, channels_last = resolve_precision(cfg.precision, device)
    splits, prep = load_splits(cfg.data, device, train_size=cfg.train_size, valid_size=cfg.valid_size,
                               test_size=cfg.test_size, subset_seed=cfg.subset_seed)
    torch.manual_seed(cfg.seed)
    net = build_model(cfg).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr_at(0), weight_decay=cfg.l2_coef if cfg.l2 else 0.0)
    run = _Run(cfg, device, dtype, channels_last, splits, prep.classes, net, opt, [])
    ckpt_path = out / CHECKPOINT
    if start.saved is not None:
        saved = start.saved
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        run.history = saved["history"]
        torch.set_rng_state(saved["rng"]["torch"])
        if "cuda" in saved["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        trial_folder.write_history(out, run.history)  # as resumed: a fallback drops the epochs it repeats
    else:
        # Checkpoints of an earlier run in this folder are no state to fall back to.
        checkpoint.discard(ckpt_path)
        checkpoint.discard(checkpoint.previous_path(ckpt_path))
        checkpoint.save({"model": net.state_dict(), "config": cfg.to_dict(), "epoch": -1}, out / "checkpoint_init.pt")
    return run


def _record_attempt(out: Path, start_epoch: int, run: _Run) -> None:
    """Who runs this attempt, where and from which epoch, with what "auto" resolved to there (the
    report's provenance): one line of attempts.jsonl."""
    env = os.environ.get
    trial_folder.append_attempt(out, {
        "pid": os.getpid(), "host": socket.gethostname(), "start_epoch": start_epoch, "time": time.time(),
        "node": env("VGG_XAI_NODE", socket.gethostname()), "ray": env("VGG_XAI_RAY"),
        "cuda_visible_devices": env("CUDA_VISIBLE_DEVICES"), "slurm_job_id": env("SLURM_JOB_ID"),
        "slurm_array_job_id": env("SLURM_ARRAY_JOB_ID"), "slurm_array_task_id": env("SLURM_ARRAY_TASK_ID"),
        "device": str(run.device), "gpu": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else None,
        "autocast": str(run.dtype).removeprefix("torch.") if run.dtype else "fp32"})


def _train_epochs(run: _Run, start_epoch: int, out: Path, log: TrialLog, scalars: Scalars,
                  report: Report | None) -> tuple[str, str | None]:
    """Train from ``start_epoch`` to the last epoch, a checkpoint and a history row after each; returns
    the trial's status and why it stopped early: completed, diverged at the first epoch whose loss is not
    finite, or (with stop_dead) collapsed at the first epoch after which its network cannot learn again."""
    cfg = run.cfg
    probe = collapse.probe_batch(run.splits["train"]) if cfg.stop_dead else None
    if probe is not None and 0 < start_epoch < cfg.epochs and (why := collapse.collapsed(run.net, *probe)):
        return "collapsed", why  # stopped so before, continued now to more epochs: still collapsed
    if cfg.compile and run.device.type != "cuda":
        log.warn(f"compile: torch.compile is used on CUDA only; ignored on {run.device.type}")
    model = torch.compile(run.net) if cfg.compile and run.device.type == "cuda" else run.net
    augment = make_augment().to(run.device) if cfg.augment else None
    for epoch in range(start_epoch, cfg.epochs):
        row = _epoch(run, model, epoch, augment)
        run.history.append(row)
        if row["status"] == "diverged":
            log.write(format_epoch(row) + "  diverged (loss not finite)")
            scalars.add(row)
            return "diverged", None  # the last good checkpoint stays as it is
        checkpoint.save({"model": run.net.state_dict(), "optimizer": run.opt.state_dict(), "epoch": epoch,
                         "rng": _rng_state(), "config": cfg.to_dict(), "history": run.history}, out / CHECKPOINT,
                        keep_previous=True)
        trial_folder.write_history(out, run.history)
        log.write(format_epoch(row))
        scalars.add(row)
        if report is not None:
            report(dict(row), out / CHECKPOINT)
        if probe is not None and epoch + 1 < cfg.epochs and (why := collapse.collapsed(run.net, *probe)):
            log.write(f"collapsed after epoch {epoch + 1} of {cfg.epochs}: {why}; stopped (training.stop_dead)")
            return "collapsed", why
    return "completed", None


def _epoch(run: _Run, model: torch.nn.Module, epoch: int, augment: torch.nn.Module | None) -> dict[str, Any]:
    """One epoch of training, then validation: its history row (status ok, or diverged, unvalidated)."""
    cfg, train = run.cfg, run.splits["train"]
    t0 = time.perf_counter()
    lr = cfg.lr_at(epoch)
    for group in run.opt.param_groups:
        group["lr"] = lr
    gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
    torch.manual_seed(epoch_seed(cfg.seed, epoch) + 1)  # augmentation and dropout
    with progress(total=math.ceil(len(train) / cfg.batch_size), desc=f"{cfg.trial_id} {epoch + 1}/{cfg.epochs}") as bar:
        loss_sum, correct = train_epoch(model, run.opt, train, cfg.batch_size, generator=gen, augment=augment,
                                        dtype=run.dtype, channels_last=run.channels_last, on_step=bar.update)
    train_s = time.perf_counter() - t0
    row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum.item() / len(train),
                           "train_acc": correct.item() / len(train)}
    if not math.isfinite(row["train_loss"]):
        return {**row, "valid_loss": float("nan"), "valid_acc": float("nan"), "seconds": time.perf_counter() - t0,
                "images_per_s": len(train) / train_s, "status": "diverged"}
    valid_loss, valid_acc, _, _ = evaluate(run.net, run.splits["valid"], cfg.batch_size, run.dtype, run.channels_last)
    return {**row, "valid_loss": valid_loss, "valid_acc": valid_acc, "seconds": time.perf_counter() - t0,
            "images_per_s": len(train) / train_s, "status": "ok"}


def _finish(run: _Run, status: str, why: str | None, out: Path, log: TrialLog, earlier_s: float,
            t_start: float) -> TrialResult:
    """Test a completed or collapsed trial and dump its test-set features; write history.csv and result.json."""
    cfg, history = run.cfg, run.history
    trial_folder.write_history(out, history)
    ok = [r for r in history if r["status"] == "ok"]
    best = max(ok, key=lambda r: r["valid_acc"]) if ok else None
    test_loss = test_acc = float("nan")
    if status in trial_folder.TESTED:
        # The test set in fp32, whatever the training precision: the interpretation suite computes
        # its CAMs and scores in fp32, so the dump, the test accuracy and the report describe one
        # computation (under bf16 autocast about 1% of the predictions differ).
        test_loss, test_acc, f, logits = evaluate(run.net, run.splits["test"], cfg.batch_size, None, False)
        features.write(out / "features.h5", features.FeatureDump(
            features=f, logits=logits, labels=run.splits["test"].labels.cpu().numpy(),
            predictions=logits.argmax(1), history={k: np.asarray([r[k] for r in history]) for k in HISTORY_COLUMNS},
            config=cfg.to_dict(), classes=run.classes, versions=versions(), git_commit=_git_commit(),
            precision="fp32",
        ))
    attempt_s = time.perf_counter() - t_start
    attempts = _attempts_since_start(out, log)
    result = TrialResult(
        trial_id=cfg.trial_id, status=status, epochs_completed=len(ok),
        best_valid_acc=best["valid_acc"] if best else float("nan"), best_epoch=best["epoch"] if best else 0,
        test_loss=test_loss, test_acc=test_acc, wall_s=earlier_s + attempt_s, attempt_s=attempt_s, attempts=attempts,
        collapsed=why,
    )
    trial_folder.write_result(out, asdict(result))
    best_text = f"best valid {result.best_valid_acc:.4f} at epoch {result.best_epoch}" if best else "no valid epoch"
    test_text = f"test {result.test_acc:.4f}" if status in trial_folder.TESTED else "no test accuracy"
    took = f"{result.wall_s:.1f} s" + (f" over {attempts} attempts, {attempt_s:.1f} s this one" if attempts > 1 else "")
    log.write(f"result: {status}, {result.epochs_completed} of {cfg.epochs} epochs good; {best_text}; {test_text}; "
              f"{took}")
    return result
