"""The one owner of forward hooks on a model, and of the temporary state reading activations needs.

Everything that looks inside a model goes through `capture` (or `prepared` when a library
places its own hooks), so hooks are always removed and the model's modes always restored,
also when the block raises.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn


def module_by_name(model: nn.Module, name: str) -> nn.Module:
    """A child of ``model.features`` by its short name (conv1, relu8, pool2), else any
    submodule by its dotted name (classifier, head.fc1)."""
    features = getattr(model, "features", None)
    if isinstance(features, nn.Module) and name in features._modules:
        return features._modules[name]
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        known = list(features._modules) if isinstance(features, nn.Module) else list(modules)[1:]
        raise ValueError(f"layer {name!r} not found; known: {', '.join(known)}")
    return modules[name]


def as_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A new float tensor on the model's device: callers' tensors are never modified or flagged."""
    p = next(model.parameters())
    return torch.as_tensor(images).detach().to(device=p.device, dtype=p.dtype).clone()


@contextmanager
def prepared(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and in-place activations switched off inside the block; every module's previous
    ``training`` and ``inplace`` flags restored afterwards.

    Why no in-place: the model's ``ReLU(inplace=True)`` overwrites the conv output that a hook
    has just recorded (a "conv output" would silently become post-ReLU), and autograd refuses
    gradients with respect to a tensor modified in place. Switching the flag is numerically
    identical and cheaper than a deepcopy of the model.
    """
    saved = [(m, m.training, getattr(m, "inplace", None)) for m in model.modules()]
    try:
        model.eval()
        for m, _, inplace in saved:
            if isinstance(inplace, bool):
                m.inplace = False
        yield model
    finally:
        for m, training, inplace in saved:
            m.training = training
            if isinstance(inplace, bool):
                m.inplace = inplace


@dataclass
class Captured:
    """What the hooks recorded, by layer name: the last forward's output (and first input)."""

    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


@contextmanager
def capture(model: nn.Module, names: Iterable[str], inputs: bool = False) -> Iterator[Captured]:
    """Record the output (and, with ``inputs=True``, the input) of each named layer on every
    forward run inside the block, with the model `prepared` (eval, no in-place).

    Tensors are kept as produced: under ``torch.no_grad`` they are plain values, otherwise they
    stay in the autograd graph so ``torch.autograd.grad(score, captured.outputs[name])`` works.
    Hooks are removed and the model restored on exit, also on an exception.
    """
    modules = {n: module_by_name(model, n) for n in names}
    rec = Captured()
    handles = []
    with prepared(model):
        try:
            for n, m in modules.items():
                handles.append(m.register_forward_hook(_recorder(rec, n, inputs)))
            yield rec
        finally:
            for h in handles:
                h.remove()


def _recorder(rec: Captured, name: str, inputs: bool):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        rec.outputs[name] = output
        if inputs:
            rec.inputs[name] = args[0]

    return hook
