"""The one owner of forward hooks on a model, and of the temporary state reading activations needs.

Everything that looks inside a model goes through `capture` (or `prepared` when a library
places its own hooks), so hooks are always removed and the model's modes always restored,
also when the block raises. What needs only outputs, many of them, runs on an `inference_copy`
in chunks of `chunk_size`.
"""

from __future__ import annotations

import copy
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


def chunk_size(device: torch.device) -> int:
    """Images per forward pass where only throughput matters: large on a GPU; small on the CPU,
    where a chunk's activations then stay in cache (width 0.125: 64 images ran 1.4x faster per
    image than 512, measured)."""
    return 512 if device.type == "cuda" else 64


def inference_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for forward passes only: eval mode, each Conv2d followed by a
    BatchNorm2d in ``model.features`` folded into one conv (the same function up to float
    rounding, one pass over the activations less), channels_last. No hooks can see a BatchNorm in
    it: use it for outputs, never for activations. With `chunk_size`, the deletion curves of a
    bn model (width 0.125) ran 3.4-3.8x faster on 2 CPU cores than NCHW in chunks of 512."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(model).eval()
    features = getattr(net, "features", None)
    if isinstance(features, nn.Sequential):
        children = list(features.named_children())
        for (name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(features, name, fuse_conv_bn_eval(conv, bn))
                setattr(features, bn_name, nn.Identity())
    return net.to(memory_format=torch.channels_last)


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
