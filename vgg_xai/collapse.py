"""Has a network collapsed for good? The check that stops a trial that cannot learn again.

After each epoch the trial looks at its network on a fixed probe batch (the first `PROBE` training
images, in fp32, no augmentation; dropout off and batch norm on the batch's statistics, as training
sees them, with its running statistics and every random generator left as they were, so the check
changes nothing the training does). The network has collapsed when both hold:

1. every probe image gets the same feature vector, bit for bit: the output ignores the input; and
2. a ReLU layer outputs zero for every probe image (a dead layer), or no gradient reaches the
   convolutions: the largest |d loss / d w| over every convolution weight is below `DEAD_GRADIENT`
   (the loss alone, without the L2 term).

Why it is permanent. Without L2 (plain VGG at a high learning rate) a layer's ReLUs output zero for
every image: nothing before them receives a gradient (a ReLU passes none where it outputs zero) and
nothing after them sees the input. Adam's moments of the weights before them then only decay (by
beta1 and beta2 a step), so those weights stop moving and the dead layer stays dead. With coupled L2 (Adam's
weight_decay adds l2_coef * w to the gradient) the weights that carry the signal have shrunk to
about zero: the signal is a product over eight layers of near-zero weights, so the loss's gradient
is orders below the decay term (measured on the CPU study's L2 trials: 1e-13 to 2e-8, with every
feature vector the same), and each step shrinks the weights further towards zero. A network that
still learns, even one at chance (plain VGG at lr 1e-3 in its first epoch), gives its images
different feature vectors and gets gradients of 1e-4 and more: condition 1 alone keeps it training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import ConvNet

PROBE = 256  # training images the check runs on
# Below this, no gradient reaches the convolutions: the collapsed trials of the CPU study measure
# 0 (no L2) and at most 2e-8 (L2); a network that learns, at chance or not, 1e-4 and more.
DEAD_GRADIENT = 1e-6


def probe_batch(train) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed probe batch of a training split (data.DeviceSplit): its first PROBE images, normalized."""
    return next(train.batches(PROBE))


def collapsed(net: ConvNet, x: torch.Tensor, y: torch.Tensor) -> str | None:
    """Why ``net`` can no longer learn (see the module's text), or None while it can."""
    buffers = {k: b.clone() for k, b in net.named_buffers()}  # batch norm's running statistics
    was_training = net.training
    net.train()
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    dead: list[str] = []  # ReLU layers that output zero for every probe image
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: dead.append(name) if out.max() <= 0 else None)
             for name, m in net.named_modules() if isinstance(m, torch.nn.ReLU)]
    try:
        with torch.no_grad():  # a network that learns stops here, after one forward pass and no graph
            features = net.forward_features(x.float())
        if torch.unique(features.reshape(len(features), -1), dim=0).shape[0] > 1:
            return None
        with torch.enable_grad():  # only for a network whose images all look the same
            weights = [conv.weight for _, conv in net.conv_layers()]
            loss = F.cross_entropy(net(x.float()).float(), y)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for k, b in net.named_buffers():
                b.copy_(buffers[k])
        net.train(was_training)
    same = f"every one of {len(x)} probe images gets the same feature vector"
    if dead:
        return f"{same}: layer {dead[0]} outputs zero for all of them"
    largest = max((float(g.abs().max()) for g in grads if g is not None), default=0.0)
    if largest >= DEAD_GRADIENT:
        return None
    return f"{same} and the largest gradient reaching a convolution is {largest:.1e}"
