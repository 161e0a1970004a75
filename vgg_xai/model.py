"""The network family as data plus one builder (in the manner of torchvision's vgg.py).

``vgg11_cifar``: VGG11's eight 3x3 convs with two max-pools instead of five, so 32x32 inputs
keep spatial extent (16x16 at the last conv, 8x8 after the last pool) for feature maps and CAMs. ``simple_cnn``: the
small convnet of the seed's preliminary study. Both take the same switches and width.

Builders never pick device or precision; the trainer does.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .config import TrialConfig

CFGS: dict[str, list[int | str]] = {
    "vgg11_cifar": [64, 128, 256, 256, "M", 512, 512, 512, 512, "M"],
    "simple_cnn": [32, "M", 64, "M", 128, "M"],
}
NUM_CLASSES = 10
FEATURE_DIM = 512  # the mlp head's feature vector


def make_layers(cfg: list[int | str], width: float, bn: bool, dropout_p: float) -> nn.Sequential:
    """Named layers conv1, bn1, relu1, ..., pool1, drop1, ... from a list of channels and 'M'."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c_in, n_conv, n_pool = 3, 0, 0
    for v in cfg:
        if v == "M":
            n_pool += 1
            layers[f"pool{n_pool}"] = nn.MaxPool2d(2)
            if dropout_p > 0:
                layers[f"drop{n_pool}"] = nn.Dropout(dropout_p)
            continue
        n_conv += 1
        c_out = max(1, round(int(v) * width))
        layers[f"conv{n_conv}"] = nn.Conv2d(c_in, c_out, 3, padding=1)
        if bn:
            layers[f"bn{n_conv}"] = nn.BatchNorm2d(c_out)
        layers[f"relu{n_conv}"] = nn.ReLU(inplace=True)
        c_in = c_out
    return nn.Sequential(layers)


class ConvNet(nn.Module):
    """features (named Sequential) -> global average pool -> head.

    The feature vector is the input of the last Linear: the 512-d output of the head's second
    layer (after its ReLU) for ``mlp``, the pooled conv channels for ``linear``.
    """

    def __init__(self, features: nn.Sequential, head: str):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        c = self.conv_layers()[-1][1].out_channels
        if head == "mlp":
            self.head = nn.Sequential(OrderedDict(
                fc1=nn.Linear(c, 1000), relu1=nn.ReLU(inplace=True),
                fc2=nn.Linear(1000, FEATURE_DIM), relu2=nn.ReLU(inplace=True),
            ))
            self.classifier = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        else:
            self.head = nn.Sequential()
            self.classifier = nn.Linear(c, NUM_CLASSES)
        self.feature_dim = self.classifier.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.forward_features(x)
        return f, self.classifier(f)

    def conv_layers(self) -> list[tuple[str, nn.Conv2d]]:
        """Every conv layer with its name, in order."""
        return [(n, m) for n, m in self.features.named_children() if isinstance(m, nn.Conv2d)]

    def last_conv(self) -> tuple[str, nn.Conv2d]:
        return self.conv_layers()[-1]

    def batchnorms(self) -> list[tuple[str, nn.BatchNorm2d]]:
        return [(n, m) for n, m in self.features.named_children() if isinstance(m, nn.BatchNorm2d)]


def _kaiming(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


def build_model(cfg: TrialConfig) -> ConvNet:
    """The model a trial config describes, on the CPU in fp32."""
    dropout_p = cfg.dropout_p if cfg.dropout else 0.0
    model = ConvNet(make_layers(CFGS[cfg.arch], cfg.width, bool(cfg.bn), dropout_p), cfg.head)
    if cfg.init == "kaiming":
        _kaiming(model)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: ConvNet, size: int = 32) -> int:
    """Multiply-adds x 2 of one forward pass (convs and linears; elementwise ops ignored)."""
    total, hw = 0, size
    for m in model.features:
        if isinstance(m, nn.Conv2d):
            total += 2 * m.in_channels * m.out_channels * 9 * hw * hw
        elif isinstance(m, nn.MaxPool2d):
            hw //= 2
    for m in list(model.head) + [model.classifier]:
        if isinstance(m, nn.Linear):
            total += 2 * m.in_features * m.out_features
    return total
