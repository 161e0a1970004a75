"""Configuration as frozen dataclasses: one trial's settings, checked strictly.

`TrialConfig` is the unit that flows from YAML or the command line to `run_trial`, to Ray and
to SLURM, and is saved with every result. Unknown keys and bad values are errors that name
the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

ARCHS = ("vgg11_cifar", "simple_cnn")
HEADS = ("mlp", "linear")
INITS = ("torch_default", "kaiming")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
SWITCHES = ("bn", "dropout", "l2", "augment")

# A variant is a name for four switches. The seed's VGG study uses the first five; its
# preliminary study on simple_cnn adds each technique on top of the last.
VARIANTS: dict[str, dict[str, bool]] = {
    "plain": dict(bn=False, dropout=False, l2=False, augment=False),
    "bn": dict(bn=True, dropout=False, l2=False, augment=False),
    "bn_dropout": dict(bn=True, dropout=True, l2=False, augment=False),
    "l2": dict(bn=False, dropout=False, l2=True, augment=False),
    "bn_augment": dict(bn=True, dropout=False, l2=False, augment=True),
    "bn_l2": dict(bn=True, dropout=False, l2=True, augment=False),
    "bn_l2_augment": dict(bn=True, dropout=False, l2=True, augment=True),
}

# Learning-rate schedules: name -> the short tag used in trial ids.
SCHEDULES = {"const_1e-3": "lr1e-3", "const_1e-2": "lr1e-2", "alternate": "lralt"}


def _choice(key: str, value: Any, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise UserError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs; saved as config.json beside its results."""

    data: str = ""  # path of the prepared HDF5 cache (see vgg_xai.data.prepare)
    arch: str = "vgg11_cifar"  # vgg11_cifar | simple_cnn
    variant: str = "bn"  # a preset name (VARIANTS) or a custom name with all four switches
    bn: bool | None = None  # the four switches; None takes the preset's value
    dropout: bool | None = None
    l2: bool | None = None
    augment: bool | None = None
    width: float = 1.0  # multiplier on conv channels: 0.125 fits a CPU, 1 is the study
    head: str = "mlp"  # mlp: 512-1000-512-10 as in the seed; linear: GAP -> Linear(C, 10)
    init: str = "torch_default"  # torch_default | kaiming
    lr_schedule: str = "const_1e-3"  # const_1e-3 | const_1e-2 | alternate
    alternate_period: int = 1  # epochs per phase of the alternating schedule
    l2_coef: float = 5e-4  # L2 penalty coefficient (coupled weight decay in Adam)
    dropout_p: float = 0.2  # dropout after each max-pool when the dropout switch is on
    epochs: int = 15
    batch_size: int = 128
    seed: int = 0  # model init, shuffling, augmentation, dropout
    train_size: int | None = None  # class-balanced subsets for smoke runs; None = all
    valid_size: int | None = None
    test_size: int | None = None
    subset_seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16
    compile: bool = False  # torch.compile the model (CUDA only)
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        _choice("arch", self.arch, ARCHS)
        _choice("head", self.head, HEADS)
        _choice("init", self.init, INITS)
        _choice("lr_schedule", self.lr_schedule, list(SCHEDULES))
        _choice("precision", self.precision, PRECISIONS)
        _choice("device", self.device, DEVICES)
        preset = VARIANTS.get(self.variant)
        for s in SWITCHES:
            value = getattr(self, s)
            if value is None:
                if preset is None:
                    raise UserError(
                        f"variant: {self.variant!r} is not a preset ({', '.join(VARIANTS)}); "
                        f"a custom variant must set all of {', '.join(SWITCHES)}"
                    )
                object.__setattr__(self, s, preset[s])
            elif not isinstance(value, bool):
                raise UserError(f"{s}: expected true or false, got {value!r}")
        if not self.width > 0:
            raise UserError(f"width: must be > 0, got {self.width}")
        for key in ("epochs", "batch_size", "alternate_period"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise UserError(f"{key}: must be a whole number >= 1, got {getattr(self, key)!r}")
        for key in ("train_size", "valid_size", "test_size"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise UserError(f"{key}: must be a whole number >= 1 or null, got {v!r}")
        if not 0 <= self.dropout_p < 1:
            raise UserError(f"dropout_p: must be in [0, 1), got {self.dropout_p}")
        if self.l2_coef < 0:
            raise UserError(f"l2_coef: must be >= 0, got {self.l2_coef}")

    @property
    def trial_id(self) -> str:
        """Readable and stable, e.g. bn_augment-lr1e-3-s0."""
        return f"{self.variant}-{SCHEDULES[self.lr_schedule]}-s{self.seed}"

    def lr_at(self, epoch: int) -> float:
        """The learning rate of a 0-based epoch."""
        if self.lr_schedule == "const_1e-3":
            return 1e-3
        if self.lr_schedule == "const_1e-2":
            return 1e-2
        return 1e-3 if (epoch // self.alternate_period) % 2 == 0 else 1e-2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "TrialConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(
                f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
            )
        for f in fields(cls):
            if f.name in d:
                _check_type(f.name, d[f.name], f.type)
        return cls(**d)

    def replace(self, **changes: Any) -> "TrialConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,)}


def _check_type(key: str, value: Any, annotation: str) -> None:
    """Check a YAML value against a field's annotation (a string under __future__ annotations)."""
    parts = [p.strip() for p in str(annotation).split("|")]
    if value is None:
        if "None" in parts:
            return
        raise UserError(f"{key}: must not be null")
    for p in parts:
        base = p.split("[")[0]
        ok = _TYPES.get(base)
        if ok and isinstance(value, ok) and not (base in ("int", "float") and isinstance(value, bool)):
            return
    raise UserError(f"{key}: expected {annotation}, got {type(value).__name__} {value!r}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise UserError(f"{p}: expected a mapping of keys to values at the top level")
    return d
