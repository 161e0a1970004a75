"""Configuration as frozen dataclasses: one trial's settings, checked strictly.

`TrialConfig` is the unit that flows from YAML or the command line to `run_trial`, to Ray and
to SLURM, and is saved with every result. Unknown keys and bad values are errors that name
the key and the allowed values.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import UserError

DEFAULT_CACHE = Path("results/data/cifar10.h5")  # the prepared data, unless a spec or --cache says where

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

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLIT_SIZES = {"train": 40_000, "valid": 10_000, "test": 10_000}  # CIFAR-10 as prepared
SUBSET_SIZES = {"train_size": "train", "valid_size": "valid", "test_size": "test"}

# The range of every numeric trial setting, checked in one place. width: the narrowest conv layer
# has 64 * width channels, so below 1/64 some layer would have none.
BOUNDS: dict[str, tuple[float, float]] = {
    "width": (1 / 64, 64), "l2_coef": (0, 1e3), "dropout_p": (0, 1), "epochs": (1, 100_000),
    "batch_size": (1, 1 << 20), "alternate_period": (1, 100_000), "seed": (0, 2**63 - 1),
    "subset_seed": (0, 2**63 - 1), **{k: (len(CLASSES), SPLIT_SIZES[split]) for k, split in SUBSET_SIZES.items()},
}

# Learning-rate schedules: name -> the short tag used in trial ids.
SCHEDULES = {"const_1e-3": "lr1e-3", "const_1e-2": "lr1e-2", "alternate": "lralt"}


# Names that become folders: a sweep's name, a variant's and so every trial id. One rule keeps
# each a single path segment (no '/', no '..', no leading '-' or '.'), printable and short
# enough for any file system, so a name can never put a folder outside its sweep.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
NAME_RULE = "1 to 128 letters, digits and _ . + -, beginning with a letter or digit, without '..'"


def check_name(key: str, value: Any) -> str:
    """value, if it is a valid name for a folder (NAME_RULE); else a one-line UserError naming key."""
    if isinstance(value, str) and NAME_RE.fullmatch(value) and ".." not in value:
        return value
    long = isinstance(value, str) and len(value) > 60
    shown = f"{value[:40]!r}... ({len(value)} characters)" if long else repr(value)
    raise UserError(f"{key}: {shown} is not a valid name; use {NAME_RULE}")


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
    stop_dead: bool = True  # stop a trial whose network has collapsed for good (see collapse.py)
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
        check_name("variant", self.variant)  # it names the trial's folder
        # nan passes every range check below (all its comparisons are false), inf the open-ended ones.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{f.name}: must be a finite number, got {value}")
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
        for key, (low, high) in BOUNDS.items():
            v = getattr(self, key)
            if v is None:
                continue
            if not low <= v <= high or (key == "dropout_p" and v == high):
                raise UserError(f"{key}: must be in [{low:g}, {high:g}{')' if key == 'dropout_p' else ']'}, got {v!r}")
            if key in SUBSET_SIZES and v % len(CLASSES) != 0:
                raise UserError(f"{key}: a class-balanced subset is a multiple of {len(CLASSES)} images, got {v}")
        if self.batch_size > (self.train_size or SPLIT_SIZES["train"]):
            raise UserError(f"batch_size: {self.batch_size} is more than the {self.train_size or SPLIT_SIZES['train']} "
                            "training images (train_size); lower it")

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

    def changes_from(self, recorded: dict[str, Any], ignore: tuple[str, ...] = ("data",)) -> dict[str, tuple]:
        """{setting: (recorded value, this value)} where a recorded config (config.json, a checkpoint's
        config) differs from this one; a setting newer than the record counts as its default there."""
        default = {f.name: f.default for f in fields(TrialConfig)}
        return {k: (recorded.get(k, default[k]), v) for k, v in self.to_dict().items()
                if k not in ignore and recorded.get(k, default[k]) != v}

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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but with YAML 1.2's numbers: PyYAML reads 1e-3 (and 1.0e3) as strings."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


MAX_YAML_VALUES = 100_000  # a spec holds hundreds; more is an alias bomb (an alias of aliases of aliases ...)


def parse_yaml(text: str, where: str) -> Any:
    """A YAML document, refused in one line where its aliases would expand it past MAX_YAML_VALUES values:
    the expanded size is counted on the composed node graph, where an alias is one shared node, before
    anything is built (building an alias bomb fills the memory)."""
    node = yaml.compose(text, Loader=_Loader)
    if node is None:
        return None
    sizes: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) not in sizes:
            sizes[id(n)] = 0  # a node that holds itself (a recursive alias) counts once
            children = [x for pair in n.value for x in pair] if isinstance(n, yaml.MappingNode) else \
                n.value if isinstance(n, yaml.SequenceNode) else []
            sizes[id(n)] = min(1 + sum(size(c) for c in children), MAX_YAML_VALUES + 1)
        return sizes[id(n)]

    if size(node) > MAX_YAML_VALUES:
        raise UserError(f"{where}: the YAML expands to more than {MAX_YAML_VALUES:,} values through its aliases "
                        "(&anchor / *alias); write the values out")
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file")
    try:
        d = parse_yaml(p.read_text(encoding="utf-8"), str(p))
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise UserError(f"{p}: expected a mapping of keys to values at the top level")
    return d


# ---------------------------------------------------------------------------- job specs

# Which trial fields each section of a job spec may set. Any of them may be a list: lists
# are crossed into the grid.
SECTIONS = {
    "model": ("arch", "width", "head", "init", "dropout_p"),
    "grid": tuple(f.name for f in fields(TrialConfig) if f.name != "data"),
    "training": ("epochs", "stop_dead", "batch_size", "precision", "compile", "device", "l2_coef",
                 "alternate_period"),
}
DATA_KEYS = ("source", "cache", "split_seed", "train_size", "valid_size", "test_size", "subset_seed")
RESOURCE_KEYS = ("cpu", "gpu")
TOP_KEYS = ("name", "data", "model", "grid", "training", "variants", "resources", "retries", "results", "compare")
# `compare:` names the reference cells of `vgg-xai results --compare` (it changes no trial).
COMPARE_KEYS = ("variant", "schedule")
ID_AXES = ("variant", "lr_schedule", "seed")  # always part of a trial id


@dataclass(frozen=True)
class JobSpec:
    """A sweep: fixed trial settings, one or more grids of crossed axes (their union), resources per
    trial, retries, results root."""

    name: str
    data: dict[str, Any]
    fixed: dict[str, Any]
    grids: list[dict[str, list[Any]]]  # each: its axes, crossed; the trials are the union of the grids
    variants: dict[str, dict[str, bool]]
    cpu: float = 1.0
    gpu: float = 0.0
    retries: int = 2
    results: str = "results"
    compare: dict[str, str] | None = None  # the reference variant and schedule of `results --compare`

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> "JobSpec":
        """The spec of a YAML file, with ``--set KEY=VALUE`` overrides applied to it before it is checked."""
        raw = load_yaml(path)
        if not overrides:
            return cls.from_dict(raw, where=str(path))
        overrides = list(overrides)
        merged = apply_overrides(raw, overrides)
        if _valid(cls, merged):
            return cls.from_dict(merged, where=str(path))
        # Name the --set (or the clashing ones) without which the spec is valid; where there is none
        # (the file is wrong itself), the file and every --set.
        culprits = [f"--set {o}" for i, o in enumerate(overrides)
                    if _valid(cls, apply_overrides(raw, overrides[:i] + overrides[i + 1:]))]
        where = " ".join(culprits) if culprits else f"{path} with " + " ".join(f"--set {o}" for o in overrides)
        return cls.from_dict(merged, where=where)  # raises, naming where

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "spec") -> "JobSpec":
        _known(where, d, TOP_KEYS)
        if d.get("name") is None:
            raise UserError(f"{where}: name: a sweep needs a name (its folder under results)")
        name = check_name(f"{where}: name", d["name"])
        data = d.get("data") or {}
        _known(f"{where}: data", data, DATA_KEYS)
        data = dict(data)
        for k in ("source", "cache"):
            if data.get(k) is not None and not isinstance(data[k], str):
                raise UserError(f"{where}: data.{k}: expected a path, got {type(data[k]).__name__} {data[k]!r}")
        split_seed = data.get("split_seed", 0)
        if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
            raise UserError(f"{where}: data.split_seed: expected a whole number >= 0, got {split_seed!r}")
        data.setdefault("source", None)
        data.setdefault("cache", None)
        data.setdefault("split_seed", 0)
        settings: dict[str, Any] = {}
        origin: dict[str, str] = {}
        grid = d.get("grid")
        if isinstance(grid, list) and not grid:
            raise UserError(f"{where}: grid: an empty list of grids gives no trials")
        grid_parts = grid if isinstance(grid, list) else [grid or {}]  # a list of grids: their union
        for section, allowed in SECTIONS.items():
            for i, part in enumerate(grid_parts if section == "grid" else [d.get(section) or {}]):
                name_i = f"grid[{i}]" if isinstance(grid, list) and section == "grid" else section
                if not isinstance(part, dict):
                    raise UserError(f"{where}: {name_i}: expected a mapping of keys to values")
                _known(f"{where}: {name_i}", part, allowed)
                for k in part:
                    first = origin.get(k)
                    if first is not None and not (section == "grid" and first.startswith("grid")):
                        raise UserError(f"{where}: {k} is set in both {origin[k]} and {name_i}; set it once")
                    origin.setdefault(k, name_i)
                if section != "grid":
                    settings.update(part)
        for k in ("train_size", "valid_size", "test_size", "subset_seed"):
            if k in data:
                settings[k] = data[k]
        variants = d.get("variants") or {}
        if not isinstance(variants, dict):
            raise UserError(f"{where}: variants: expected a mapping of names to switches, e.g. "
                            "{{mine: {{bn: true, dropout: false, l2: true, augment: false}}}}")
        for vname, switches in variants.items():
            check_name(f"{where}: variants", vname)
            if not isinstance(switches, dict):
                raise UserError(f"{where}: variants.{vname}: expected a mapping of {', '.join(SWITCHES)}")
            _known(f"{where}: variants.{vname}", switches, SWITCHES)
            missing = [s for s in SWITCHES if s not in switches]
            if missing:
                raise UserError(f"{where}: variants.{vname}: set all four switches (missing {', '.join(missing)})")
        res = d.get("resources") or {}
        _known(f"{where}: resources", res, RESOURCE_KEYS)
        cpu, gpu = res.get("cpu", 1), res.get("gpu", 0)
        for key, v in (("cpu", cpu), ("gpu", gpu)):
            finite = not isinstance(v, float) or math.isfinite(v)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not finite or v < 0:
                raise UserError(f"{where}: resources.{key}: expected a finite number >= 0, got {v!r}")
        if gpu > 1 and gpu != int(gpu):
            raise UserError(f"{where}: resources.gpu: a fraction must be below 1 (0.25 packs four trials a GPU), "
                            f"got {gpu}")
        if cpu <= 0:
            raise UserError(f"{where}: resources.cpu: a trial needs some CPU, got {cpu}")
        retries = d.get("retries", 2)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise UserError(f"{where}: retries: expected a whole number >= 0, got {retries!r}")
        for k, v in [*settings.items(), *(kv for part in grid_parts for kv in part.items())]:
            # a value, or a list of values to cross: never a mapping or nested list
            if isinstance(v, dict) or (isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v)):
                raise UserError(f"{where}: {k}: expected a value or a list of values, got {v!r}")
            if isinstance(v, list) and not v:
                raise UserError(f"{where}: {k}: an empty list gives no trials")
        fixed = {k: v for k, v in settings.items() if not isinstance(v, list)}
        shared = {k: list(v) for k, v in settings.items() if isinstance(v, list)}
        grids = [{**shared, **{k: list(v) if isinstance(v, list) else [v] for k, v in part.items()}}
                 for part in grid_parts]
        union = {k: [v for g in grids for v in g.get(k, [])] or settings.get(k, []) for k in ("variant", "lr_schedule")}
        spec = cls(name=name, data=data, fixed=fixed, grids=grids, variants=dict(variants), cpu=float(cpu),
                   gpu=float(gpu), retries=retries, results=_path(where, "results", d.get("results", "results")),
                   compare=_compare(where, d.get("compare"), union))
        spec.trials("/dev/null", where=where)  # every trial must be a valid TrialConfig
        return spec

    def trials(self, data_path: str, where: str = "spec") -> list[tuple[str, TrialConfig]]:
        """(trial_id, config) of every point of the grids, in a stable order. A trial in several grids
        counts once; a setting that takes several values over the grids (other than the variant, the
        schedule and the seed) is part of every trial's id."""
        import itertools

        values: dict[str, set] = collections.defaultdict(set)
        default = {f.name: f.default for f in fields(TrialConfig)}
        named = {k for g in self.grids for k in g}
        for g in self.grids:  # a grid that does not name a setting takes the fixed value, else the default
            for k in named:
                values[k].update(map(repr, g.get(k) or [self.fixed.get(k, default.get(k))]))
        shown = [k for k in values if k not in ID_AXES and len(values[k]) > 1]
        out, seen = [], {}
        for g in self.grids:
            keys = list(g)
            grid_ids = collections.Counter()
            for combo in itertools.product(*(g[k] for k in keys)):
                d = {**self.fixed, **dict(zip(keys, combo)), "data": data_path}
                d.update(self.variants.get(d.get("variant", "bn"), {}))
                try:
                    cfg = TrialConfig.from_dict(d, where="trial")
                except UserError as e:
                    raise UserError(f"{where}: {e}") from None
                tid = cfg.trial_id + "".join(f"-{k}{getattr(cfg, k)}" for k in shown)
                check_name(f"{where}: the trial id made of {', '.join((*ID_AXES, *shown))}", tid)
                grid_ids[tid] += 1
                if tid in seen:
                    if seen[tid] != cfg:
                        raise UserError(f"{where}: two grids give trial {tid} different settings; make them agree "
                                        "or set the setting that differs as a list in one grid")
                    continue
                seen[tid] = cfg
                out.append((tid, cfg))
            dup = sorted(t for t, n in grid_ids.items() if n > 1)  # linear: 40,000 trials plan in seconds
            if dup:
                raise UserError(f"{where}: the grid repeats trials ({', '.join(dup[:3])}); "
                                "remove duplicate list values")
        return out

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as YAML-able data (saved as spec.yaml with the results)."""
        return {"name": self.name, "data": dict(self.data), "fixed": dict(self.fixed),
                **({"axes": dict(self.grids[0])} if len(self.grids) == 1 else {"grids": [dict(g) for g in self.grids]}),
                "variants": dict(self.variants),
                "resources": {"cpu": self.cpu, "gpu": self.gpu}, "retries": self.retries,
                **({"compare": dict(self.compare)} if self.compare else {})}


def _valid(cls: type[JobSpec], d: dict[str, Any]) -> bool:
    try:
        cls.from_dict(d)
    except UserError:
        return False
    return True


SET_EXAMPLE = "e.g. --set training.epochs=1 or --set 'grid.variant=[bn, plain]'"


def parse_override(item: str) -> tuple[list[str], Any]:
    """``KEY=VALUE`` of ``--set``: the dotted KEY split into its parts, and VALUE read as YAML."""
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq:
        raise UserError(f"--set {item!r}: no '='; write KEY=VALUE, {SET_EXAMPLE}")
    if not key:
        raise UserError(f"--set {item!r}: the key before '=' is empty; write KEY=VALUE, {SET_EXAMPLE}")
    path = key.split(".")
    if not all(path):
        raise UserError(f"--set {item!r}: the key {key!r} has an empty part; write dotted keys as in the "
                        f"job spec, {SET_EXAMPLE}")
    try:
        value = parse_yaml(text, f"--set {key}")
    except yaml.YAMLError as e:
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"--set {item!r}: the value is not valid YAML ({why}); write it as in the job spec and "
                        f"quote it for the shell, {SET_EXAMPLE}") from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of a job spec's raw mapping with each ``--set KEY=VALUE`` applied in order (a later one
    wins). KEY is a dotted path (training.epochs, variants.mine.bn); the mappings on the way are made
    where the spec lacks them. Which keys and values are allowed is JobSpec.from_dict's to check,
    the same as for the file."""
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for i, part in enumerate(path[:-1]):
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], dict):
                above = ".".join(path[:i + 1])
                raise UserError(f"--set {item}: {above} is {node[part]!r}, not a mapping of keys; "
                                f"set {above}=VALUE to replace it")
            node = node[part]
        node[path[-1]] = value
    return out


def _path(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise UserError(f"{where}: {key}: expected a folder path, got {value!r}")
    return value


def _compare(where: str, d: Any, settings: dict[str, Any]) -> dict[str, str] | None:
    """The spec's `compare:` section, checked against the variants and schedules the grid has."""
    if d is None:
        return None
    if not isinstance(d, dict):
        raise UserError(f"{where}: compare: expected a mapping, e.g. {{variant: plain, schedule: const_1e-3}}")
    _known(f"{where}: compare", d, COMPARE_KEYS)
    for key, axis in (("variant", "variant"), ("schedule", "lr_schedule")):
        have = settings.get(axis, [])
        have = have if isinstance(have, list) else [have]
        if key in d and d[key] not in have:
            raise UserError(f"{where}: compare.{key}: {d[key]!r} is not in the grid's {axis} "
                            f"({', '.join(map(str, have)) or 'none set'}); name one of them")
    return {k: str(v) for k, v in d.items()}


def _known(where: str, d: dict[str, Any], allowed: tuple[str, ...]) -> None:
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a mapping of keys to values")
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")


# ---------------------------------------------------------------------------- cluster profiles

@dataclass(frozen=True)
class ClusterProfile:
    """Where SLURM jobs run: sbatch settings as data (cluster/*.yaml)."""

    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    nodes: int = 1  # nodes of the sweep job (one Ray node each)
    gpus_per_node: int = 0
    cpus_per_task: int = 2  # one task per node: all of a node's CPUs for its Ray node
    mem_gb: float | None = None
    time_min: int = 60  # time limit of each job
    signal_delay_s: int = 120  # warning before the limit: stop Ray, requeue, resume
    constraint: str | None = None
    extra_sbatch: dict[str, str] = dataclasses.field(default_factory=dict)  # e.g. {"exclusive": ""}
    setup: list[str] = dataclasses.field(default_factory=list)  # e.g. ["module load cuda", "source venv/bin/activate"]
    env: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ClusterProfile":
        return cls.from_dict(load_yaml(path), where=str(path))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "cluster profile") -> "ClusterProfile":
        _known(where, d, tuple(f.name for f in fields(cls)))
        for f in fields(cls):
            if f.name in d:
                kind = str(f.type)
                v = d[f.name]
                if kind.startswith("dict"):
                    if not isinstance(v, dict):
                        raise UserError(f"{where}: {f.name}: expected a mapping")
                    d = {**d, f.name: {str(k): "" if x is None else str(x) for k, x in v.items()}}
                elif kind.startswith("list"):
                    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                        raise UserError(f"{where}: {f.name}: expected a list of shell lines")
                else:
                    try:
                        _check_type(f.name, v, kind)
                    except UserError as e:
                        raise UserError(f"{where}: {e}") from None
        p = cls(**d)
        for key in ("nodes", "cpus_per_task", "time_min"):
            if getattr(p, key) < 1:
                raise UserError(f"{where}: {key}: must be >= 1, got {getattr(p, key)}")
        if p.gpus_per_node < 0:
            raise UserError(f"{where}: gpus_per_node: must be >= 0, got {p.gpus_per_node}")
        if p.time_min * 60 <= p.signal_delay_s + 60:
            raise UserError(f"{where}: time_min: {p.time_min} min leaves no time to work and checkpoint before the "
                            f"{p.signal_delay_s} s warning (signal_delay_s); give at least "
                            f"{(p.signal_delay_s + 60) // 60 + 1} min")
        return p
